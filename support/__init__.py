"""The guards beside the lesson: what train.py, sample.py and eval.py need that is not the method itself.
common (one error line, the shared flags) · hf_config (config.json, families) · checkpoint (safetensors files)
· jsonfile (the one JSON reader) · publish (atomic writes) · train_config (train.py's flags, resolved once)
· plan (memory, time) · memory (tiled MLP, checkpoints on the host) · rundir (--out, lock, resumable state)
· distributed (process group, SIGTERM) · progress (log lines) · eval_checks (eval.py's flags) · samples
(eval.py ruler's audit file) · report (tables, plots) · fastpaths (chunked loss, CPU kernels).
The lesson imports these; these import no command and, of the lesson, only rope.py (the methods' names and
RopeConfig: it imports nothing) and, in train_config alone, model.py's LlamaConfig the flags resolve into;
the data/ libraries where a flag names data (a dataset, a tokenizer, RULER's tasks)."""
