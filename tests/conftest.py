"""Shared test setup."""
import pytest


@pytest.fixture(scope="session", autouse=True)
def _isolated_dataset_cache(tmp_path_factory):
    """Offline datasets are cached under a per-session temporary directory, never in the user's ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PAPERBENCH_CACHE", str(tmp_path_factory.mktemp("paperbench-cache")))
        yield
