"""Attack tests: each file tries one class of abuse against the real gateway."""
