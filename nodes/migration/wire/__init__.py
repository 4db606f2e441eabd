"""The bytes on the wire: the record stream (`records`, `encoded`, `pagesets`), the TCP
`channel` and its ticket, the page encodings (`zeropage`, `xbzrle`, `compression`) and what a
migration is told may cross (`capabilities`)."""
