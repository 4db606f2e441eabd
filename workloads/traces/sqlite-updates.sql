PRAGMA cache_size = -65536;
PRAGMA journal_mode = OFF;
PRAGMA synchronous = OFF;
CREATE TABLE kv(id INTEGER PRIMARY KEY, v INTEGER, pad TEXT);
WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 200000)
INSERT INTO kv SELECT i, 0, hex(randomblob(40)) FROM n;
WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 300000)
UPDATE kv SET v = v + 1 WHERE id IN (SELECT abs(random()) % 200000 + 1 FROM n);
WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 300000)
UPDATE kv SET v = v + 1, pad = hex(randomblob(40)) WHERE id IN (SELECT abs(random()) % 20000 + 1 FROM n);
SELECT count(*), sum(v) FROM kv;
