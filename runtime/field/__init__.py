"""Field use on the device: screening sessions, the durable result store, the audit log and watch mode."""
