"""Opening a study's storage: a URL that cannot be opened is reported without its password, in
the error, in the bundle's storage file and by the command."""

from __future__ import annotations

import pytest

from autonorm import AutoNormError
from autonorm.search._export import STORAGE_FILE, write_storage_file
from autonorm.search._storage import make_storage

SECRET = "s3cr3t-Pw"


@pytest.mark.parametrize(
    "url",
    [
        f"postgresql://:{SECRET}@127.0.0.1:9/db",
        f"postgresql://u@127.0.0.1:9/db?password={SECRET}",
        f"postgresql://u@127.0.0.1:9/db?connect_timeout=2&Password={SECRET}",
    ],
)
def test_opening_a_bad_postgres_url_never_shows_the_password(url, tmp_path, workdir, autonorm_cli):
    with pytest.raises(AutoNormError, match="cannot open storage") as err:
        make_storage(url, tmp_path)
    assert SECRET not in str(err.value)
    write_storage_file(tmp_path, url, "study")
    written = (tmp_path / STORAGE_FILE).read_text()
    assert SECRET not in written and "***" in written
    args = ["search", "--model", "usermodels.Net", "--data", "usermodels.Data"]
    result = autonorm_cli(
        [*args, "--search.storage", url, "--search.out_dir", str(tmp_path / "o")], workdir
    )
    assert result.returncode != 0 and "cannot open storage" in result.stderr
    assert SECRET not in result.stdout + result.stderr
