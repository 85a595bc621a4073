from push.tests.conftest import wire_format  # noqa: F401 - every wire format, as in push/tests
