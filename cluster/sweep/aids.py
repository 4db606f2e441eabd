"""The convergence aids a sweep's `aid` axis chooses between, each as the MigrationSettings
fields it sets: a non-converging guest run with and without each, side by side."""

AIDS: dict[str, dict] = {
    "none": {},
    "auto-converge": {"auto_converge": True},                       # QEMU's defaults
    "dirty-limit": {"dirty_limit_bytes_per_second": 20e6},          # 20 MB/s per vCPU
    "pause-after-5s": {"completion_timeout_seconds": 5.0, "on_timeout": "pause"},
}
