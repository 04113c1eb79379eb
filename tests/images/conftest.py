"""The image tests' fixtures: ``net_guard`` refuses every connection outside loopback in this process."""

from tests.support.net_guard import net_guard  # noqa: F401 (registered as a fixture here)
