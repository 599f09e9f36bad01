"""Reading and writing files safely: passwords masked in any text shown or written, study names
turned into one folder, and config and search-space files whose YAML or JSON refuses duplicated
keys and aliases."""

from __future__ import annotations

import string
import time

import pytest

from autonorm import ConfigError, NormConfig
from autonorm._io import mask_password, safe_folder_name
from autonorm.search_spaces import resolve_space

SECRET = "s3cr3t-Pw"

URL_SHAPES = [
    f"postgresql://user:{SECRET}@db.example.com:5432/studies",
    f"postgresql://:{SECRET}@db.example.com/studies",
    f"postgresql+psycopg://user:{SECRET}@[::1]:5432/studies?sslmode=require",
    f"postgresql://user:p@ss{SECRET}@host/studies",  # a raw '@' in the password: masked whole
    f"postgresql://user@host/studies?password={SECRET}",
    f"postgresql://user@host/studies?sslmode=require&password={SECRET}&application_name=x",
    f"postgresql://user@host/studies?PassWord={SECRET}",
    f"mysql+pymysql://user@host/studies?passwd={SECRET}",
    f"host=db.example.com password={SECRET} dbname=studies",
    f"cannot open storage 'postgresql://u:{SECRET}@h/db': refused; also \"mysql://:{SECRET}@h/x\"",
]


# -- passwords ---------------------------------------------------------------------------------


@pytest.mark.parametrize("text", URL_SHAPES)
def test_mask_password_hides_every_url_shape(text):
    masked = mask_password(text)
    assert SECRET not in masked and "***" in masked
    assert mask_password(masked) == masked  # idempotent: masking a masked text changes nothing
    assert masked == text.replace(f"p@ss{SECRET}", "***").replace(SECRET, "***")


#: Every character class SQLAlchemy's URL parser takes in a password as written (all but a raw
#: ``@``): ASCII punctuation, quotes, a space, ``:``, ``/``, ``#``, ``?``, non-ASCII, and percent
#: escapes (``%40`` is an ``@``).
PASSWORD_CLASSES = [
    *(f"a{c}b{SECRET}" for c in string.punctuation if c != "@"),
    f"with space {SECRET}",
    f"ünï{SECRET}çødé",
    f"p%40ss%2F{SECRET}",
    f"{SECRET}:colon:",
]


@pytest.mark.parametrize("password", PASSWORD_CLASSES)
def test_mask_password_masks_every_password_sqlalchemy_reads(password):
    from sqlalchemy.engine import make_url

    url = f"postgresql+psycopg://bob:{password}@db.example.com:5432/studies"
    assert make_url(url).password is not None  # SQLAlchemy reads a password there
    hidden = make_url(url).render_as_string(hide_password=True)
    assert mask_password(url) == hidden
    assert SECRET not in mask_password(url)
    for shown in (f"cannot open storage {url!r}: refused", f"storage: {url}\n", f'"{url}"'):
        assert SECRET not in mask_password(shown), shown
        assert mask_password(mask_password(shown)) == mask_password(shown)


@pytest.mark.parametrize(
    "text",
    ["sqlite:////tmp/a b/study.db", "/data/journal.log", "postgresql://user@host:5432/db", "x=1"],
)
def test_mask_password_leaves_text_without_password(text):
    assert mask_password(text) == text


# -- study names as folders --------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["../evil", "/tmp/x", "..", ".", "", "a/../../b", "a\\b", "x" * 300]
)
def test_safe_folder_name_stays_one_folder_inside(name, tmp_path):
    folder = safe_folder_name(name)
    assert (tmp_path / folder).resolve().parent == tmp_path.resolve()
    assert folder and not folder.startswith(".") and len(folder) < 120
    assert safe_folder_name(name.replace("/", "_")) != folder or "/" not in name


# -- duplicated keys ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "slots:\n  bn1: layernorm\n  bn2: batchnorm\n  bn1: groupnorm\n",
        "slots:\n  bn1:\n    name: groupnorm\n    groups: 2\n    groups: 4\n",
        "slots:\n  bn1: layernorm\nmetadata: {}\nslots:\n  bn1: batchnorm\n",
    ],
)
def test_a_duplicated_yaml_key_is_an_error(text, tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"cfg.yaml' is not valid YAML: duplicated key '\w+'"):
        NormConfig.load(path)


def test_a_duplicated_json_key_is_an_error(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text('{"slots": {"bn1": "layernorm", "bn1": "batchnorm"}}')
    with pytest.raises(ConfigError, match="cfg.json' is not valid JSON: duplicated key 'bn1'"):
        NormConfig.load(path)


def test_the_json_duplicate_check_is_linear_in_the_keys():
    """200,000 keys (a quadratic check: 4e10 comparisons, hours) read in well under the bound;
    a duplicate among them is still named."""
    from autonorm._io import load_json

    body = ",".join(f'"k{i}": {i}' for i in range(200_000))
    started = time.perf_counter()
    assert len(load_json("{" + body + "}", "big.json")) == 200_000
    assert time.perf_counter() - started < 20
    with pytest.raises(ConfigError, match="duplicated key 'k7'"):
        load_json("{" + body + ', "k7": 0}', "big.json")


def test_a_duplicated_key_in_a_search_space_file_is_an_error(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("choices:\n  '*': [batchnorm]\n  '*': [layernorm]\n")
    with pytest.raises(ConfigError, match=r"space.yaml' is not valid YAML: duplicated key '\*'"):
        resolve_space(str(path))


# -- YAML aliases ------------------------------------------------------------------------------


def test_a_config_with_aliases_is_refused_at_once(tmp_path, alias_bomb):
    path = tmp_path / "bomb.yaml"
    path.write_text(alias_bomb)
    assert len(path.read_bytes()) < 500
    started = time.perf_counter()
    with pytest.raises(ConfigError, match=r"bomb.yaml' is not valid YAML: aliases \(\*a\)"):
        NormConfig.load(path)
    # refused before any expansion, which took 32 s and 1.3 GB; a generous bound, for 2 cores
    # that other jobs share
    assert time.perf_counter() - started < 5
    path.write_text("slots:\n  bn1: &x layernorm\n  bn2: *x\n")  # even a harmless one
    with pytest.raises(ConfigError, match="aliases"):
        NormConfig.load(path)


def test_a_search_space_with_aliases_is_refused(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("choices:\n  'a.*': &c [batchnorm, layernorm]\n  'b.*': *c\n")
    with pytest.raises(ConfigError, match=r"space.yaml' is not valid YAML: aliases \(\*c\)"):
        resolve_space(str(path))


@pytest.mark.parametrize(
    ("loader", "text"),
    [("yaml", "a: " + "[" * 5000 + "]" * 5000), ("json", "[" * 100_000 + "]" * 100_000)],
)
def test_a_config_nested_too_deeply_is_one_line_not_a_recursion_error(loader, text):
    from autonorm._io import load_json, load_yaml

    load = load_yaml if loader == "yaml" else load_json
    with pytest.raises(ConfigError, match="'deep' is nested too deeply to be a config"):
        load(text, "'deep'")
