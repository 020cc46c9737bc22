import pytest


@pytest.fixture(autouse=True)
def isolated_user_store(tmp_path, monkeypatch):
    """Never touch the real ~/.cache: the feature cache and models go to a temporary store."""
    monkeypatch.setenv("MEDDINOV3_HOME", str(tmp_path / "meddinov3-home"))
