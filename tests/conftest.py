"""Root conftest: registers the fixture plugins every test directory may use."""

pytest_plugins = [
    "tests.fixtures.cluster",
    "tests.fixtures.s3",
    "tests.fixtures.prometheus",
]
