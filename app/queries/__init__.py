"""SQL only, one module per resource. Functions take a read-only connection and return typed rows."""
