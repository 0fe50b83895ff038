"""One process cannot lock the others out of handle tickets: past the daemon-wide cap, the process
holding the most tickets loses its own oldest."""

from __future__ import annotations

import pytest

from hotweights import errors
from hotweightsd.core.leases import TicketBook, check_holder_label


def test_a_process_filling_every_ticket_loses_its_own_not_the_others():
    book = TicketBook(ttl=60, clock=lambda: 0.0, limit=100, per_lease=4)
    greedy = [book.issue(f"greedy-{i // 4}", 0, pid=66) for i in range(100)]  # 25 leases, 4 tickets each
    assert len(book) == 100 and book.held_by(66) == 100
    for _ in range(3):
        victim = book.issue("victim", 0, pid=7)
        assert book.redeem(victim.token).pid == 7
    # the first made room (the greedy process's oldest went), the others found it
    assert len(book) == 99 and book.held_by(66) == 99
    with pytest.raises(errors.TicketInvalid):
        book.redeem(greedy[0].token)
    assert book.redeem(greedy[1].token).pid == 66


def test_past_the_cap_the_oldest_ticket_of_the_process_holding_the_most_goes():
    book = TicketBook(ttl=60, clock=lambda: 0.0, limit=6, per_lease=10)
    small = [book.issue("s", 0, pid=1) for _ in range(2)]
    big = [book.issue("b", 0, pid=2) for _ in range(4)]
    book.issue("n", 0, pid=3)  # pid 2 holds 4 of 6: its oldest goes
    with pytest.raises(errors.TicketInvalid):
        book.redeem(big[0].token)
    assert (book.held_by(1), book.held_by(2), book.held_by(3)) == (2, 3, 1)
    book.issue("n", 0, pid=3)
    book.issue("n", 0, pid=3)  # 2, 2, 2 then 2, 1, 3: ties go to either, never past the cap
    assert len(book) == 6 and book.held_by(3) >= 2
    assert sum(book.held_by(p) for p in (1, 2, 3)) == 6
    assert all(t.token for t in small)


def test_the_holder_check_runs_with_the_ticket_book_free_and_a_ticket_is_spent_once():
    """The check reads /proc for a peer in another pid namespace: a stalled read must not stall every
    issue and redeem, so it runs outside the book's lock; the ticket is still spent by one redeem only."""
    book = TicketBook(ttl=60, clock=lambda: 0.0)
    ticket = book.issue("lease", 0, pid=1)
    free: list[bool] = []
    outcomes: list[object] = []

    def redeem() -> None:
        try:
            outcomes.append(book.redeem(ticket.token, check))
        except errors.TicketInvalid as exc:
            outcomes.append(exc)

    def check(t) -> None:
        got = book._lock.acquire(blocking=False)
        if got:
            book._lock.release()
        free.append(got)
        if got and len(free) == 1:  # a second redeem of the same ticket while the first is checking
            redeem()

    redeem()
    assert free and all(free)
    assert sum(o == ticket for o in outcomes) == 1, outcomes
    assert sum(isinstance(o, errors.TicketInvalid) for o in outcomes) == 1, outcomes
    assert len(book) == 0
    with pytest.raises(errors.TicketInvalid):
        book.redeem(ticket.token)


@pytest.mark.parametrize("holder", ["h" * 257, "tab\there", "nl\n", "\x00"])
def test_a_holder_label_must_be_short_and_printable(holder):
    with pytest.raises(errors.InvalidArgument):
        check_holder_label(holder)
    assert check_holder_label("vllm rank 0 · pid 12") == "vllm rank 0 · pid 12"
