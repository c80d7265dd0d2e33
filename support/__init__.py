"""The guards beside the lesson: what train.py, sample.py and eval.py need that is not the method itself.
common (one error line, the shared flags) · hf_config (config.json, families) · checkpoint (safetensors files)
· publish (atomic writes) · train_config (train.py's flags, resolved once) · plan (memory, time) · rundir
(--out, lock, resumable state) · distributed (process group, SIGTERM) · progress (log lines) · report
(tables, plots) · fastpaths (chunked loss, CPU kernels).
The lesson imports these; these import no command, of the lesson only rope.py (the methods' names and
RopeConfig, which import nothing) and, in train_config alone, model.py's LlamaConfig the flags resolve into."""
