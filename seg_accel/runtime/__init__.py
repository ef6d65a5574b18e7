"""What every command shares at run time: the Accelerator, console and log-file output, atomic
writes and manifests, the work-dir and checkpoint folder names."""
