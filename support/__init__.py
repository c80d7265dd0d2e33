"""The guards beside the lesson: what train.py, sample.py and eval.py need that is not the method itself.
common (one error line, the shared flags) · hf_config (config.json, families) · checkpoint (safetensors files)
· publish (atomic writes) · train_config (train.py's flags, resolved once) · plan (memory, time) · rundir
(--out, lock, resumable state) · distributed (process group, SIGTERM) · progress (log lines) · report
(tables, plots) · fastpaths (chunked loss, CPU kernels)."""
