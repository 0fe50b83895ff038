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


@pytest.mark.parametrize("holder", ["h" * 257, "tab\there", "nl\n", "\x00"])
def test_a_holder_label_must_be_short_and_printable(holder):
    with pytest.raises(errors.InvalidArgument):
        check_holder_label(holder)
    assert check_holder_label("vllm rank 0 · pid 12") == "vllm rank 0 · pid 12"
