"""Plain helpers the tests need when their modules are imported (markers, constants);
everything else is a fixture (tests/conftest.py and the conftest.py of each folder)."""
