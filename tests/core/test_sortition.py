"""Sortition: determinism, unpredictability, weights over many real VRF draws, and the attacks that
commit-then-reveal and verify_selection must stop."""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import replace
from decimal import Decimal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trustcap import sortition, vrf
from trustcap.sortition import Candidate, Reveal, SortitionError

SEED = hashlib.sha256(b"epoch-7").digest()


def _sk(i: int, tag: bytes = b"node") -> bytes:
    return hashlib.sha256(tag + b"-%d" % i).digest()


def _candidates(stakes: list[int], rep: int = 10_000, tag: bytes = b"node") -> list[Candidate]:
    return [
        Candidate(f"gw-{i}", vrf.public_key(_sk(i, tag)), stake, rep) for i, stake in enumerate(stakes)
    ]


def _token(n: int) -> bytes:
    return b"\x5a" * n


def _round(cands: list[Candidate], alpha: bytes, tag: bytes = b"node") -> tuple[dict[str, bytes], list[Reveal]]:
    commitments: dict[str, bytes] = {}
    reveals: list[Reveal] = []
    for i, c in enumerate(cands):
        com, rev = sortition.participate(c.node_id, _sk(i, tag), alpha, token=_token)
        commitments[c.node_id] = com
        reveals.append(rev)
    return commitments, reveals


# --- inputs and weights ------------------------------------------------------------------------------


def test_alpha_separates_role_round_capsule_and_seed() -> None:
    base = sortition.selection_alpha("cap-1", SEED)
    others = {
        sortition.selection_alpha("cap-1", SEED, "committee", 0),
        sortition.selection_alpha("cap-1", SEED, "committee", 1),
        sortition.selection_alpha("cap-2", SEED),
        sortition.selection_alpha("cap-1", hashlib.sha256(b"epoch-8").digest()),
    }
    assert base not in others and len(others) == 4


@pytest.mark.parametrize(
    ("args", "match"),
    [
        pytest.param(("", SEED), "capsule id", id="empty-capsule"),
        pytest.param(("c", b"short"), "32 bytes", id="short-seed"),
        pytest.param(("c", SEED, "proposer"), "role", id="unknown-role"),
        pytest.param(("c", SEED, "committee", -1), "round", id="negative-round"),
    ],
)
def test_bad_alpha_inputs(args: tuple[object, ...], match: str) -> None:
    with pytest.raises(SortitionError, match=match):
        sortition.selection_alpha(*args)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("stake", "rep", "expected"),
    [
        pytest.param(100, 10_000, 100 * 100_000, id="full-reputation"),
        pytest.param(100, 0, 100 * 10_000, id="zero-reputation-keeps-a-tenth"),
        pytest.param(100, 5_000, 100 * 55_000, id="half-reputation"),
    ],
)
def test_weight_formula(stake: int, rep: int, expected: int) -> None:
    assert sortition.weight(stake, rep) == expected


def test_full_reputation_weighs_ten_times_zero_as_decision_0010_says() -> None:
    assert sortition.weight(7, 10_000) == 10 * sortition.weight(7, 0)


@pytest.mark.parametrize(
    ("stake", "rep"),
    [
        pytest.param(0, 10, id="zero-stake"),
        pytest.param(-5, 10, id="negative-stake"),
        pytest.param(1, 10_001, id="reputation-above-scale"),
        pytest.param(1, -1, id="negative-reputation"),
        pytest.param(True, 1, id="bool-stake"),
    ],
)
def test_bad_weights(stake: int, rep: int) -> None:
    with pytest.raises(SortitionError):
        sortition.weight(stake, rep)


def test_draw_is_exact_and_ordered_by_weight_for_same_beta() -> None:
    beta = b"\x80" + b"\x00" * 31
    assert sortition.draw(beta, 2) < sortition.draw(beta, 1)
    assert isinstance(sortition.draw(beta, 1), Decimal)
    assert sortition.draw(b"\xff" * 32, 1) == 0  # u = 1: the smallest possible draw


# --- properties (hypothesis) -------------------------------------------------------------------------

CANDS3 = _candidates([10, 20, 30])


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(capsule=st.text(min_size=1, max_size=40), order=st.permutations(range(3)))
def test_selection_is_deterministic_and_ignores_candidate_order(capsule: str, order: list[int]) -> None:
    alpha = sortition.selection_alpha(capsule, SEED)
    _, reveals = _round(CANDS3, alpha)
    first = sortition.select_executor(CANDS3, alpha, reveals)
    again = sortition.select_executor([CANDS3[i] for i in order], alpha, [reveals[i] for i in order])
    assert first == again


@settings(max_examples=20, deadline=None)
@given(capsule=st.text(min_size=1, max_size=40))
def test_a_different_secret_key_gives_an_unrelated_output(capsule: str) -> None:
    """Unpredictable without the secret: two keys never share a draw, and a third party's key gives it
    nothing: it cannot produce a proof that verifies under the node's public key."""
    alpha = sortition.selection_alpha(capsule, SEED)
    assert vrf.evaluate(_sk(0), alpha) != vrf.evaluate(_sk(0, b"other"), alpha)
    forged = vrf.prove(_sk(0, b"other"), alpha)
    with pytest.raises(Exception, match="does not verify"):
        vrf.verify(vrf.public_key(_sk(0)), forged, alpha)


# --- the protocol and its attacks --------------------------------------------------------------------

CANDS = _candidates([5, 10, 15, 20, 25])
ALPHA = sortition.selection_alpha("capsule-psi", SEED)
COMMITS, REVEALS = _round(CANDS, ALPHA)
WINNER = sortition.select_executor(CANDS, ALPHA, REVEALS)


def test_honest_selection_verifies() -> None:
    sortition.verify_selection(CANDS, ALPHA, COMMITS, REVEALS, WINNER)


def test_winner_is_the_lowest_draw() -> None:
    betas = {r.node_id: vrf.proof_to_hash(r.pi) for r in REVEALS}
    draws = {c.node_id: sortition.draw(betas[c.node_id], sortition.weight(c.stake, c.reputation_bp)) for c in CANDS}
    assert WINNER == min(draws, key=lambda n: draws[n])


LOSER = next(c.node_id for c in CANDS if c.node_id != WINNER)
LOSER_INDEX = int(LOSER.split("-")[1])


def _replace_reveal(node: str, **changes: bytes) -> list[Reveal]:
    return [replace(r, **changes) if r.node_id == node else r for r in REVEALS]  # type: ignore[arg-type]


ATTACKS = [
    pytest.param(COMMITS, REVEALS, LOSER, "was not the rightful winner", id="scheduler-names-a-loser"),
    pytest.param(
        COMMITS, [r for r in REVEALS if r.node_id != WINNER], LOSER, "no published reveal", id="winner-reveal-withheld"
    ),
    pytest.param(
        COMMITS,
        _replace_reveal(LOSER, salt=b"\x00" * 32),
        WINNER,
        "does not match its commitment",
        id="reveal-with-other-salt",
    ),
    pytest.param(
        COMMITS,
        _replace_reveal(LOSER, pi=vrf.prove(_sk(LOSER_INDEX), b"alpha the node chose")),
        WINNER,
        "does not match its commitment",
        id="grinding-with-own-alpha",
    ),
    pytest.param(
        {**COMMITS, LOSER: sortition.commitment(ALPHA, LOSER, vrf.prove(_sk(9, b"x"), ALPHA), _token(32))},
        _replace_reveal(LOSER, pi=vrf.prove(_sk(9, b"x"), ALPHA)),
        WINNER,
        "VRF proof does not verify",
        id="proof-from-another-key",
    ),
    pytest.param(
        {k: v for k, v in COMMITS.items() if k != LOSER}, REVEALS, WINNER, "have no commitment", id="uncommitted-node"
    ),
    pytest.param({**COMMITS, "gw-stranger": b"\x00" * 32}, REVEALS, WINNER, "non-candidates", id="stranger-commits"),
    pytest.param(COMMITS, [*REVEALS, REVEALS[0]], WINNER, "revealed twice", id="double-reveal"),
]


@pytest.mark.parametrize(("commits", "reveals", "claimed", "match"), ATTACKS)
def test_attacks_on_selection_are_caught(
    commits: dict[str, bytes], reveals: list[Reveal], claimed: str, match: str
) -> None:
    with pytest.raises(SortitionError, match=match):
        sortition.verify_selection(CANDS, ALPHA, commits, reveals, claimed)


def test_proof_for_other_alpha_is_refused_by_scheduler() -> None:
    other = sortition.selection_alpha("capsule-other", SEED)
    _, reveals = _round(CANDS, other)
    with pytest.raises(SortitionError, match="does not verify"):
        sortition.select_executor(CANDS, ALPHA, reveals)


def test_duplicate_and_missing_candidates() -> None:
    with pytest.raises(SortitionError, match="twice"):
        sortition.select_executor([CANDS[0], CANDS[0]], ALPHA, REVEALS[:1])
    with pytest.raises(SortitionError, match="no VRF output"):
        sortition.select_executor(CANDS, ALPHA, REVEALS[:-1])
    with pytest.raises(SortitionError, match="not a candidate"):
        sortition.select_executor(CANDS[:-1], ALPHA, REVEALS)
    with pytest.raises(SortitionError, match="no candidates"):
        sortition.select_executor([], ALPHA, [])


def test_committee_excludes_executor_and_verifies() -> None:
    calpha = sortition.selection_alpha("capsule-psi", SEED, "committee", 1)
    commits, reveals = _round(CANDS, calpha)
    committee = sortition.select_committee(CANDS, calpha, reveals, 3, WINNER)
    assert len(committee) == 3 and WINNER not in committee and len(set(committee)) == 3
    sortition.verify_committee(CANDS, calpha, commits, reveals, WINNER, committee)
    outsider = next(n for n in (c.node_id for c in CANDS) if n not in committee and n != WINNER)
    with pytest.raises(SortitionError, match="not the rightful one"):
        sortition.verify_committee(CANDS, calpha, commits, reveals, WINNER, [*committee[:2], outsider])
    with pytest.raises(SortitionError, match="committee size"):
        sortition.select_committee(CANDS, calpha, reveals, 5, WINNER)


# --- statistics over real VRF outputs ------------------------------------------------------------------
# Fixed keys and alphas: the run is reproducible bit for bit. Tolerance: chi-square with 3 degrees of
# freedom must stay below 16.27 (p = 0.001); the same statistic against the wrong hypothesis must exceed
# it (the test has the power to fail).

ROUNDS = 1200
CHI2_DF3_P001 = 16.266


@pytest.fixture(scope="module")
def betas() -> list[dict[str, bytes]]:
    """ROUNDS x 4 real VRF outputs (evaluate == proof_to_hash(prove), checked in test_vrf)."""
    keys = {f"gw-{i}": _sk(i, b"stat") for i in range(4)}
    return [
        {n: vrf.evaluate(sk, sortition.selection_alpha(f"capsule-{r}", SEED)) for n, sk in keys.items()}
        for r in range(ROUNDS)
    ]


def _chi2(observed: Counter[str], expected: dict[str, float]) -> float:
    return sum((observed[n] - e) ** 2 / e for n, e in expected.items())


@pytest.mark.slow
def test_selection_frequency_follows_weight(betas: list[dict[str, bytes]]) -> None:
    cands = _candidates([1, 2, 3, 4], tag=b"stat")
    total = sum(c.stake for c in cands)
    wins = Counter(sortition.rank(cands, b)[0] for b in betas)
    expected = {c.node_id: ROUNDS * c.stake / total for c in cands}
    chi2 = _chi2(wins, expected)
    print(f"weights 1:2:3:4 over {ROUNDS} draws: wins {dict(sorted(wins.items()))}, chi2 = {chi2:.2f}")
    assert chi2 < CHI2_DF3_P001
    uniform = {c.node_id: ROUNDS / 4 for c in cands}
    assert _chi2(wins, uniform) > CHI2_DF3_P001  # power: equal odds would be rejected


@pytest.mark.slow
def test_reputation_scales_weight(betas: list[dict[str, bytes]]) -> None:
    """Same stake; reputation 10000 vs 0 bp: weights 100000 : 10000 ... expected wins follow the formula."""
    cands = [
        Candidate(f"gw-{i}", vrf.public_key(_sk(i, b"stat")), 10, rep)
        for i, rep in enumerate([10_000, 10_000, 5_000, 0])
    ]
    w = {c.node_id: sortition.weight(c.stake, c.reputation_bp) for c in cands}
    wins = Counter(sortition.rank(cands, b)[0] for b in betas)
    expected = {n: ROUNDS * x / sum(w.values()) for n, x in w.items()}
    # gw-2 and gw-3 pooled (df = 2, p = 0.001: 13.82); gw-3 alone expects ~45 wins of 1200
    pooled_obs = Counter({"gw-0": wins["gw-0"], "gw-1": wins["gw-1"], "rest": wins["gw-2"] + wins["gw-3"]})
    pooled_exp = {"gw-0": expected["gw-0"], "gw-1": expected["gw-1"], "rest": expected["gw-2"] + expected["gw-3"]}
    chi2 = _chi2(pooled_obs, pooled_exp)
    print(f"reputation 1:1:0.5:0 over {ROUNDS} draws: wins {dict(sorted(wins.items()))}, chi2 = {chi2:.2f}")
    assert chi2 < 13.816


@pytest.mark.slow
def test_winner_is_not_biased_toward_input_order(betas: list[dict[str, bytes]]) -> None:
    """Equal weights, candidates always listed in the same order: the winner's position is uniform."""
    cands = _candidates([7, 7, 7, 7], tag=b"stat")
    positions = Counter(str(int(sortition.rank(cands, b)[0].split("-")[1])) for b in betas)
    chi2 = _chi2(positions, {str(i): ROUNDS / 4 for i in range(4)})
    print(f"equal weights over {ROUNDS} draws: winner positions {dict(sorted(positions.items()))}, chi2 = {chi2:.2f}")
    assert chi2 < CHI2_DF3_P001


def test_trust_root_nodes_take_part_without_unsealing_their_vrf_secret(tmp_path: object) -> None:
    """Gateways prove through trustcap.trustroot (secret sealed); the selection verifies as usual."""
    from pathlib import Path

    from trustcap.trustroot import SoftwareTrustRoot

    roots = []
    for i in range(3):
        home = Path(str(tmp_path)) / f"gw-{i}"
        home.mkdir()
        roots.append(SoftwareTrustRoot.create(home, bytes([i + 1]) * 32))
    cands = [Candidate(f"gw-{i}", r.vrf_public_key(), 10 * (i + 1), 8_000) for i, r in enumerate(roots)]
    commits: dict[str, bytes] = {}
    reveals: list[Reveal] = []
    for c, r in zip(cands, roots, strict=True):
        com, rev = sortition.participate_with(c.node_id, r.vrf_prove, ALPHA)
        commits[c.node_id] = com
        reveals.append(rev)
    winner = sortition.select_executor(cands, ALPHA, reveals)
    sortition.verify_selection(cands, ALPHA, commits, reveals, winner)
