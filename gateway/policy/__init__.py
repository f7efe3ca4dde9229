"""The security team's policy file: compiled to Casbin, evaluated per request, reloaded live."""
