"""The token store: reloads that keep the tokens when the file is empty or unreadable, and
the watch through which a transport ends the sessions of a revoked token."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest

from pipeline.frontend.security import TokenStore


@pytest.fixture
def tokens_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens"
    path.write_text("# comment\nalpha\nbeta\n")
    return path


def test_an_empty_file_on_reload_keeps_the_old_tokens(tokens_file: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """A tokens file caught mid-write (empty, or comments only) is not taken: every old
    token stays valid, no session is ended, and the log says why."""
    store = TokenStore(tokens_file)
    ended: list[str] = []
    store.watch("alpha", lambda: ended.append("alpha"))
    for content in ("", "# only a comment\n\n"):
        tokens_file.write_text(content)
        with caplog.at_level(logging.ERROR):
            store.reload()
        assert store.accepts("alpha") and store.accepts("beta")
        assert "holds no token (caught mid-write?); the previous 2 stay valid" in caplog.text
        caplog.clear()
    assert ended == []


def test_an_unreadable_file_on_reload_keeps_the_old_tokens(tokens_file: Path) -> None:
    """A tokens file that cannot be read (removed) keeps the old tokens."""
    store = TokenStore(tokens_file)
    tokens_file.unlink()
    store.reload()
    assert store.accepts("alpha") and not store.accepts("gamma")


def test_a_reload_ends_the_watches_of_revoked_tokens_only(tokens_file: Path) -> None:
    """Dropping 'alpha' from the file calls every open watch of 'alpha' once; the watches
    of the token that stays, and the ones already closed, are not called."""
    store = TokenStore(tokens_file)
    ended: list[str] = []
    first = store.watch("alpha", lambda: ended.append("alpha 1"))
    store.watch("alpha", lambda: ended.append("alpha 2"))
    kept = store.watch("beta", lambda: ended.append("beta"))
    with store.watch("alpha", lambda: ended.append("closed")):
        pass
    tokens_file.write_text("beta\ngamma\n")
    store.reload()
    assert sorted(ended) == ["alpha 1", "alpha 2"]
    assert first.revoked and not kept.revoked
    assert store.watching() == 1
    tokens_file.write_text("gamma\n")
    store.reload()
    store.reload()  # once only
    assert sorted(ended) == ["alpha 1", "alpha 2", "beta"] and store.watching() == 0


def test_a_failing_callback_does_not_keep_other_sessions_open(tokens_file: Path) -> None:
    """One watch whose callback raises is logged; the other watches of the token still end."""
    store = TokenStore(tokens_file)
    ended: list[str] = []

    def broken() -> None:
        raise RuntimeError("transport bug")

    store.watch("alpha", broken)
    store.watch("alpha", lambda: ended.append("other"))
    tokens_file.write_text("beta\n")
    store.reload()
    assert ended == ["other"]


def test_without_auth_nothing_is_watched_or_revoked() -> None:
    """With no tokens file every token is accepted and a watch never fires."""
    store = TokenStore(None)
    watch = store.watch(None, lambda: pytest.fail("revoked without auth"))
    store.reload()
    assert store.accepts(None) and not watch.revoked and store.watching() == 0
    watch.close()
