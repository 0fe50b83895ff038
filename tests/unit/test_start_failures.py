"""A load that failed at start leaves status once what it failed to make exists, and only then."""

from __future__ import annotations

from hotweightsd.core.events import EventBus, EventKind
from hotweightsd.startfailures import StartFailures


def tracked() -> tuple[EventBus, list[str], StartFailures]:
    bus, shown = EventBus(), []
    return bus, shown, StartFailures(shown, bus)


def test_a_versioned_load_is_mended_once_its_version_is_ready_and_its_aliases_name_it():
    bus, shown, failures = tracked()
    failures.load_failed({"name": "m", "version": "v1", "aliases": ["prod"]}, "preload m@v1: gone")
    failures.load_failed({"name": "m", "version": "v2", "aliases": []}, "reload m@v2: gone")
    assert shown == ["preload m@v1: gone", "reload m@v2: gone"]
    bus.publish(EventKind.VERSION_READY, "m", version="v1")
    bus.publish(EventKind.ALIAS_MOVED, "m", version="v0", alias="prod")  # another version of it
    bus.publish(EventKind.VERSION_READY, "other", version="v2")
    assert shown == ["preload m@v1: gone", "reload m@v2: gone"]
    bus.publish(EventKind.VERSION_READY, "m", version="v2")
    assert shown == ["preload m@v1: gone"]
    bus.publish(EventKind.ALIAS_MOVED, "m", version="v1", alias="prod")
    assert shown == []
    bus.publish(EventKind.VERSION_FREED, "m", version="v1")  # once mended, gone for good
    assert shown == []


def test_an_alias_moved_away_again_before_the_others_are_set_does_not_count():
    bus, shown, failures = tracked()
    failures.load_failed({"name": "m", "version": "v1", "aliases": ["a", "b"]}, "preload m@v1: gone")
    bus.publish(EventKind.ALIAS_MOVED, "m", version="v1", alias="a")
    bus.publish(EventKind.ALIAS_REMOVED, "m", version="v1", alias="a")
    bus.publish(EventKind.ALIAS_MOVED, "m", version="v1", alias="b")
    assert shown == ["preload m@v1: gone"]
    bus.publish(EventKind.ALIAS_MOVED, "m", version="v1", alias="a")
    assert shown == []


def test_what_happened_before_the_failure_does_not_mend_it():
    # A preload skipped because its NAME@VERSION is resident with other content: that version's READY
    # and its alias came first, so they are not the operator's fix.
    bus, shown, failures = tracked()
    bus.publish(EventKind.VERSION_READY, "m", version="v1")
    bus.publish(EventKind.ALIAS_MOVED, "m", version="v1", alias="prod")
    failures.load_failed({"name": "m", "version": "v1", "aliases": ["prod"]}, "preload m@v1: skipped")
    bus.publish(EventKind.VERSION_READY, "x", version="v9")
    assert shown == ["preload m@v1: skipped"]
    bus.publish(EventKind.ALIAS_MOVED, "m", version="v1", alias="prod")
    assert shown == []


def test_a_preload_without_a_version_is_mended_only_by_a_later_load_of_its_own_path(tmp_path):
    bus, shown, failures = tracked()
    mine, other = str(tmp_path / "m-v1"), str(tmp_path / "m-v2")
    failures.load_failed({"name": "m", "path": mine, "aliases": []}, "preload m: gone")
    failures.load_failed({"name": "n", "path": str(tmp_path / "n"), "aliases": ["prod"]}, "preload n: gone")
    # another version of m (another preload's, or an operator's load from elsewhere) mends nothing
    bus.publish(EventKind.VERSION_ADDED, "m", version="fp-other", message=other)
    bus.publish(EventKind.VERSION_READY, "m", version="fp-other")
    assert shown == ["preload m: gone", "preload n: gone"]
    bus.publish(EventKind.VERSION_ADDED, "m", version="fp-1234", message=mine)
    bus.publish(EventKind.VERSION_ADDED, "n", version="fp-5678", message=str(tmp_path / "n"))
    bus.publish(EventKind.VERSION_READY, "n", version="fp-5678")
    assert shown == ["preload m: gone", "preload n: gone"]
    bus.publish(EventKind.VERSION_READY, "m", version="fp-1234")
    assert shown == ["preload n: gone"]
    bus.publish(EventKind.ALIAS_MOVED, "n", version="fp-5678", alias="prod")
    assert shown == []


def test_a_preload_path_that_later_leads_elsewhere_through_a_link_is_judged_as_it_resolves_then(tmp_path):
    bus, shown, failures = tracked()
    link = tmp_path / "current"
    failures.load_failed({"name": "m", "path": str(link), "aliases": []}, "preload m: gone")  # no link yet
    (tmp_path / "v8").mkdir()
    link.symlink_to(tmp_path / "v8")  # the operator puts the model there through a link, and loads it
    bus.publish(EventKind.VERSION_ADDED, "m", version="fp-8", message=str((tmp_path / "v8").resolve()))
    bus.publish(EventKind.VERSION_READY, "m", version="fp-8")
    assert shown == []


def test_the_aliases_a_load_set_before_it_failed_count_toward_mending_it():
    # the preload set alias a, then failed to set clash (a model has that name): the operator mends the
    # clash and sets it by hand; a already names the version, before the failure
    bus, shown, failures = tracked()
    bus.publish(EventKind.VERSION_READY, "m", version="v1")
    bus.publish(EventKind.ALIAS_MOVED, "m", version="v1", alias="a")
    failures.load_failed({"name": "m", "version": "v1", "aliases": ["a", "clash"]}, "preload m@v1: clash", ["a"])
    bus.publish(EventKind.ALIAS_MOVED, "m", version="v1", alias="clash")
    assert shown == []


def test_a_dropped_alias_is_mended_once_the_alias_exists_again():
    bus, shown, failures = tracked()
    failures.aliases_dropped([("prod", "alias 'prod' named m@v1: not restored"), ("dev", "alias 'dev' ...")])
    bus.publish(EventKind.VERSION_READY, "m", version="v1")
    assert len(shown) == 2
    bus.publish(EventKind.ALIAS_MOVED, "m", version="v3", alias="prod")
    assert shown == ["alias 'dev' ..."]
    failures.unsubscribe()
    bus.publish(EventKind.ALIAS_MOVED, "m", version="v3", alias="dev")
    assert shown == ["alias 'dev' ..."]
