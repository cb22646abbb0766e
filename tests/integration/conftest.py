from tests.integration.harness import demo_base, demo_data  # noqa: F401 (fixtures)
