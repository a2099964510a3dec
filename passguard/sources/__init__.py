"""Where targets come from: ``static`` (config and files), ``kuma`` (the control plane);
``sourceset`` merges them for the daemon and the one-shot check."""
