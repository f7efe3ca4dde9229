"""The test suite, a package: helpers are imported as ``tests.harness``, ``tests.upstreams``... from the repo root."""
