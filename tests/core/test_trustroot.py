"""The trust root: one behaviour suite run on both backends (software, and Zymkey through the real
`zymkey` module bound to the OpenSSL stand-in of tests/zymkey_standin), then what is backend-specific:
file permissions and KEK handling, the Zymkey error table, tamper, and module failures."""

from __future__ import annotations

import inspect
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from ecdsa import BadSignatureError, SECP256k1, VerifyingKey
from eth_keys.datatypes import PublicKey
from eth_utils.address import is_checksum_address

from trustcap import vrf
from trustcap.trustroot import (
    KeyFilePermissions,
    SealedDataError,
    SoftwareTrustRoot,
    TamperDetected,
    TrustRoot,
    TrustRootLocked,
    TrustRootOperationError,
    TrustRootTimeout,
    TrustRootUnavailable,
    ZymkeyTrustRoot,
    load_kek,
    new_kek_file,
    open_trust_root,
)
from trustcap.trustroot import zymkey as zk
from trustcap.trustroot._secp256k1 import HALF_N, N

STANDIN_SRC = Path(__file__).resolve().parents[1] / "zymkey_standin"
DIGEST = bytes(range(32))


@pytest.fixture(scope="session")
def standin_library(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Build the stand-in libzk_app_utils.so into a temp dir (never into /usr/lib)."""
    if shutil.which("cc") is None or shutil.which("make") is None:
        pytest.skip("no C compiler or make: cannot build the Zymkey stand-in (scripts/apt-packages.txt: gcc, make)")
    out = tmp_path_factory.mktemp("zkstandin") / "libzk_app_utils.so"
    subprocess.run(["make", "-s", "-C", str(STANDIN_SRC), f"OUT={out}"], check=True, timeout=120)
    return str(out)


@pytest.fixture
def zk_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The stand-in module's state directory (its keys, serial, one-way key)."""
    state = tmp_path / "zkstate"
    monkeypatch.setenv("ZYMKEY_STANDIN_STATE", str(state))
    return state


Reopen = Callable[[], TrustRoot]


@pytest.fixture(params=["software", "zymkey"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[TrustRoot, Reopen]]:
    """A fresh trust root of each backend, and a way to open it again from its store."""
    home = tmp_path / "home"
    if request.param == "software":
        kek = os.urandom(32)
        root: TrustRoot = SoftwareTrustRoot.create(home, kek)
        yield root, lambda: SoftwareTrustRoot.open(home, kek)
    else:
        lib = request.getfixturevalue("standin_library")
        request.getfixturevalue("zk_state")
        root = ZymkeyTrustRoot.create(home, library_path=lib)
        yield root, lambda: ZymkeyTrustRoot.open(home, library_path=lib)
    root.close()


# ---------------------------------------------------------------- shared behaviour, both backends


def test_public_key_and_address(backend: tuple[TrustRoot, Reopen]) -> None:
    root, _ = backend
    pk = root.public_key()
    assert len(pk) == 33 and pk[0] in (2, 3)
    assert is_checksum_address(root.address)
    assert root.address == PublicKey.from_compressed_bytes(pk).to_checksum_address()


def test_signature_is_recoverable_low_s_and_verifies_independently(backend: tuple[TrustRoot, Reopen]) -> None:
    root, _ = backend
    sig = root.sign_digest(DIGEST)
    assert len(sig) == 65 and sig[64] in (27, 28)
    assert int.from_bytes(sig[32:64], "big") <= HALF_N
    # an independent implementation (python-ecdsa) agrees
    VerifyingKey.from_string(root.public_key(), curve=SECP256k1).verify_digest(sig[:64], DIGEST)
    assert root.verify(DIGEST, sig)
    assert root.verify(DIGEST, sig, public_key=root.public_key())


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda s, d: (s, bytes([d[0] ^ 1]) + d[1:]), id="other-digest"),
        pytest.param(lambda s, d: (s[:5] + bytes([s[5] ^ 1]) + s[6:], d), id="flipped-r"),
        pytest.param(lambda s, d: (s[:40] + bytes([s[40] ^ 1]) + s[41:], d), id="flipped-s"),
        pytest.param(lambda s, d: (s[:64] + bytes([55 - s[64]]), d), id="other-v"),
        pytest.param(lambda s, d: (s[:64] + b"\x00", d), id="v-out-of-range"),
        pytest.param(lambda s, d: (s[:64], d), id="truncated"),
        pytest.param(
            lambda s, d: (s[:32] + (N - int.from_bytes(s[32:64], "big")).to_bytes(32, "big") + bytes([55 - s[64]]), d),
            id="high-s-twin",
        ),
    ],
)
def test_altered_signature_does_not_verify(
    backend: tuple[TrustRoot, Reopen], mutate: Callable[[bytes, bytes], tuple[bytes, bytes]]
) -> None:
    root, _ = backend
    sig, digest = mutate(root.sign_digest(DIGEST), DIGEST)
    assert not root.verify(digest, sig)


def test_signature_by_another_key_does_not_verify(backend: tuple[TrustRoot, Reopen], tmp_path: Path) -> None:
    root, _ = backend
    other = SoftwareTrustRoot.create(tmp_path / "other", os.urandom(32))
    assert not root.verify(DIGEST, other.sign_digest(DIGEST))
    assert root.verify(DIGEST, other.sign_digest(DIGEST), public_key=other.public_key())


@pytest.mark.parametrize("digest", [pytest.param(b"", id="empty"), pytest.param(b"x" * 31, id="31-bytes"),
                                    pytest.param(b"x" * 33, id="33-bytes")])
def test_sign_refuses_a_digest_that_is_not_32_bytes(backend: tuple[TrustRoot, Reopen], digest: bytes) -> None:
    root, _ = backend
    with pytest.raises(TrustRootOperationError, match="32 bytes"):
        root.sign_digest(digest)


def test_reopened_root_has_the_same_identity(backend: tuple[TrustRoot, Reopen]) -> None:
    root, reopen = backend
    again = reopen()
    assert again.public_key() == root.public_key()
    assert again.address == root.address
    assert again.serial() == root.serial()
    assert again.vrf_public_key() == root.vrf_public_key()
    assert root.verify(DIGEST, again.sign_digest(DIGEST))


def test_seal_roundtrip_and_context_binding(backend: tuple[TrustRoot, Reopen]) -> None:
    root, reopen = backend
    sealed = root.seal(b"secret data", b"ctx-a")
    assert b"secret data" not in sealed
    assert root.unseal(sealed, b"ctx-a") == b"secret data"
    assert reopen().unseal(sealed, b"ctx-a") == b"secret data"
    assert root.unseal(root.seal(b"", b""), b"") == b""
    with pytest.raises(SealedDataError):
        root.unseal(sealed, b"ctx-b")
    with pytest.raises(SealedDataError):
        root.unseal(sealed)


def test_every_altered_byte_of_sealed_data_is_refused(backend: tuple[TrustRoot, Reopen]) -> None:
    root, _ = backend
    sealed = root.seal(b"k" * 8, b"ctx")
    for i in range(len(sealed)):
        altered = sealed[:i] + bytes([sealed[i] ^ 0x01]) + sealed[i + 1:]
        with pytest.raises(SealedDataError):
            root.unseal(altered, b"ctx")
    for n in range(len(sealed)):
        with pytest.raises(SealedDataError):
            root.unseal(sealed[:n], b"ctx")


def test_data_sealed_by_another_root_is_refused(backend: tuple[TrustRoot, Reopen], tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    root, _ = backend
    sealed = root.seal(b"mine", b"ctx")
    if root.backend == "software":
        other: TrustRoot = SoftwareTrustRoot.create(tmp_path / "other", os.urandom(32))
    else:
        monkeypatch.setenv("ZYMKEY_STANDIN_STATE", str(tmp_path / "other-module"))
        other = ZymkeyTrustRoot.create(tmp_path / "other", library_path=zk.load_module().zka.zkalib._name)
    assert other.serial() != root.serial()
    with pytest.raises(SealedDataError):
        other.unseal(sealed, b"ctx")


def test_random(backend: tuple[TrustRoot, Reopen]) -> None:
    root, _ = backend
    a, b = root.random(32), root.random(32)
    assert len(a) == 32 and a != b
    assert root.random(0) == b""
    with pytest.raises(TrustRootOperationError):
        root.random(-1)


def test_vrf_proofs_verify_under_the_published_vrf_key(backend: tuple[TrustRoot, Reopen]) -> None:
    root, reopen = backend
    alpha = b"capsule-id|epoch-seed"
    pi = root.vrf_prove(alpha)
    assert vrf.verify(root.vrf_public_key(), pi, alpha) == vrf.proof_to_hash(pi)
    assert reopen().vrf_prove(alpha) == pi  # deterministic, same sealed secret


def test_no_secret_is_stored_in_the_clear(backend: tuple[TrustRoot, Reopen], tmp_path: Path) -> None:
    root, _ = backend
    store = next((tmp_path / "home").iterdir()).read_bytes()
    vrf_secret = root._vrf_secret()
    assert vrf_secret.hex().encode() not in store and vrf_secret not in store
    if isinstance(root, SoftwareTrustRoot):
        assert root._secret.hex().encode() not in store


def test_store_is_private_and_never_overwritten(backend: tuple[TrustRoot, Reopen], tmp_path: Path) -> None:
    root, _ = backend
    (store,) = (tmp_path / "home").iterdir()
    assert store.stat().st_mode & 0o777 == 0o600
    with pytest.raises(TrustRootOperationError, match="already exists"):
        if isinstance(root, SoftwareTrustRoot):
            SoftwareTrustRoot.create(tmp_path / "home", os.urandom(32))
        else:
            ZymkeyTrustRoot.create(tmp_path / "home")


def test_open_trust_root_picks_the_backend(backend: tuple[TrustRoot, Reopen], tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    root, _ = backend
    if isinstance(root, SoftwareTrustRoot):
        kek_file = tmp_path / "kek"
        kek = new_kek_file(kek_file)
        home = tmp_path / "home2"
        SoftwareTrustRoot.create(home, kek)
        assert open_trust_root(home, kek_file=kek_file).backend == "software"
    else:
        assert open_trust_root(tmp_path / "home").address == root.address
    with pytest.raises(TrustRootUnavailable, match="no trust root"):
        open_trust_root(tmp_path / "empty")


def test_tamper_status_is_clear_on_a_fresh_root(backend: tuple[TrustRoot, Reopen]) -> None:
    root, _ = backend
    status = root.tamper_status()
    assert not status.breached
    assert status.supported == (root.backend == "zymkey")


# ---------------------------------------------------------------- software backend


@pytest.mark.parametrize("mode", [pytest.param(0o640, id="group-read"), pytest.param(0o604, id="other-read"),
                                  pytest.param(0o620, id="group-write"), pytest.param(0o644, id="0644")])
def test_software_refuses_a_key_store_open_to_others(tmp_path: Path, mode: int) -> None:
    kek = os.urandom(32)
    SoftwareTrustRoot.create(tmp_path, kek)
    store = tmp_path / "trustroot.json"
    store.chmod(mode)
    with pytest.raises(KeyFilePermissions, match=f"chmod 600 {store}") as info:
        SoftwareTrustRoot.open(tmp_path, kek)
    assert str(store) in str(info.value) and f"{mode:04o}" in str(info.value)


def test_software_refuses_a_kek_file_open_to_others(tmp_path: Path) -> None:
    kek_file = tmp_path / "kek"
    new_kek_file(kek_file)
    kek_file.chmod(0o644)
    with pytest.raises(KeyFilePermissions, match=f"chmod 600 {kek_file}"):
        load_kek(kek_file)


def test_software_wrong_kek_is_refused(tmp_path: Path) -> None:
    SoftwareTrustRoot.create(tmp_path, os.urandom(32))
    with pytest.raises(TrustRootLocked, match="wrong key-encryption key"):
        SoftwareTrustRoot.open(tmp_path, os.urandom(32))


def test_software_kek_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRUSTCAP_TRUSTROOT_KEK", raising=False)
    with pytest.raises(TrustRootLocked, match="TRUSTCAP_TRUSTROOT_KEK"):
        load_kek(None)
    kek = os.urandom(32)
    monkeypatch.setenv("TRUSTCAP_TRUSTROOT_KEK", kek.hex())
    assert load_kek(None) == kek
    monkeypatch.setenv("TRUSTCAP_TRUSTROOT_KEK", "abcd")
    with pytest.raises(TrustRootLocked, match="not 32 bytes"):
        load_kek(None)
    with pytest.raises(TrustRootUnavailable, match="does not exist"):
        load_kek(tmp_path / "missing")
    new_kek_file(tmp_path / "k")
    with pytest.raises(TrustRootOperationError, match="already exists"):
        new_kek_file(tmp_path / "k")


@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        pytest.param("format", "other/9", TrustRootUnavailable, id="format"),
        pytest.param("publicKey", "02" + "11" * 32, SealedDataError, id="swapped-public-key"),
        pytest.param("signingKey", "zz", TrustRootUnavailable, id="signing-key-not-hex"),
        pytest.param("signingKey", "54435331" + "00" * 40, TrustRootLocked, id="signing-key-forged"),
        pytest.param("serial", "sw-0000", TrustRootLocked, id="serial-changed"),
    ],
)
def test_software_altered_store_is_refused(tmp_path: Path, field: str, value: str, error: type[Exception]) -> None:
    import json

    kek = os.urandom(32)
    SoftwareTrustRoot.create(tmp_path, kek)
    store = tmp_path / "trustroot.json"
    doc = json.loads(store.read_text())
    doc[field] = value
    store.write_text(json.dumps(doc))
    with pytest.raises(error):
        SoftwareTrustRoot.open(tmp_path, kek)


# ---------------------------------------------------------------- zymkey backend: errors and tamper


def test_every_upstream_zymkey_exception_is_mapped(standin_library: str) -> None:
    module = zk.load_module(standin_library)
    upstream = {
        name for name, cls in inspect.getmembers(module.exceptions, inspect.isclass)
        if issubclass(cls, Exception) and cls.__module__ == "zymkey.exceptions"
    }
    assert upstream, "found no upstream exception classes to check"
    assert upstream <= set(zk.UPSTREAM_ERRORS), f"unmapped: {upstream - set(zk.UPSTREAM_ERRORS)}"


def _upstream(name: str) -> Exception:
    cls: type[Exception] = getattr(zk.load_module().exceptions, name)
    return cls("boom")


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        pytest.param(lambda: AssertionError("bad return code -110"), TrustRootTimeout, id="rc-etimedout"),
        pytest.param(lambda: AssertionError("bad return code -11"), TrustRootTimeout, id="rc-eagain"),
        pytest.param(lambda: AssertionError("bad return code -19"), TrustRootUnavailable, id="rc-enodev"),
        pytest.param(lambda: AssertionError("bad return code -5"), TrustRootUnavailable, id="rc-eio"),
        pytest.param(lambda: AssertionError("bad return code -13"), TrustRootLocked, id="rc-eacces"),
        pytest.param(lambda: AssertionError("bad return code -95"), TrustRootOperationError, id="rc-eopnotsupp"),
        pytest.param(lambda: AssertionError("bad return code -1234"), TrustRootOperationError, id="rc-unknown"),
        pytest.param(lambda: _upstream("ZymkeyLibraryError"), TrustRootUnavailable, id="library-error"),
        pytest.param(lambda: _upstream("ZymkeyTimeoutError"), TrustRootTimeout, id="timeout-error"),
        pytest.param(lambda: _upstream("VerificationError"), SealedDataError, id="verification-error"),
        pytest.param(lambda: _upstream("VaultError"), TrustRootOperationError, id="vault-error"),
        pytest.param(lambda: _upstream("CommandError"), TrustRootOperationError, id="command-error"),
        pytest.param(lambda: ModuleNotFoundError("zymkey"), TrustRootUnavailable, id="not-installed"),
        pytest.param(lambda: OSError("cannot load"), TrustRootUnavailable, id="dlopen-failed"),
        pytest.param(lambda: AttributeError("zkFoo"), TrustRootUnavailable, id="missing-symbol"),
        pytest.param(lambda: KeyError("ed448"), TrustRootOperationError, id="bad-argument"),
    ],
)
def test_translate_table(standin_library: str, make: Callable[[], Exception], expected: type[Exception]) -> None:
    zk.load_module(standin_library)
    got = zk._translate(make(), "do a thing")
    assert type(got) is expected
    assert str(got).startswith("zymkey: cannot do a thing")


def test_zymkey_no_device_is_unavailable(standin_library: str, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ZYMKEY_STANDIN_STATE", raising=False)
    with pytest.raises(TrustRootUnavailable, match="cannot open the module"):
        ZymkeyTrustRoot.create(tmp_path / "home", library_path=standin_library)
    state = tmp_path / "zk"
    state.mkdir()
    (state / "fail").write_text("open")
    monkeypatch.setenv("ZYMKEY_STANDIN_STATE", str(state))
    with pytest.raises(TrustRootUnavailable, match="cannot open the module"):
        ZymkeyTrustRoot.create(tmp_path / "home", library_path=standin_library)


def test_zymkey_timeout_surfaces_as_timeout(standin_library: str, tmp_path: Path, zk_state: Path) -> None:
    root = ZymkeyTrustRoot.create(tmp_path / "home", library_path=standin_library)
    (zk_state / "fail").write_text("timeout")
    with pytest.raises(TrustRootTimeout, match="ETIMEDOUT"):
        root.sign_digest(DIGEST)


def test_zymkey_refuses_a_slot_that_is_not_secp256k1(standin_library: str, tmp_path: Path, zk_state: Path) -> None:
    with pytest.raises(TrustRootOperationError, match="slot 0 does not hold a secp256k1 key"):
        ZymkeyTrustRoot.create(tmp_path / "home", library_path=standin_library, slot=0)
    with pytest.raises(TrustRootOperationError, match="ENOENT"):
        ZymkeyTrustRoot.create(tmp_path / "home", library_path=standin_library, slot=40)


def test_zymkey_store_on_another_module_is_refused(standin_library: str, tmp_path: Path, zk_state: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    ZymkeyTrustRoot.create(tmp_path / "home", library_path=standin_library)
    monkeypatch.setenv("ZYMKEY_STANDIN_STATE", str(tmp_path / "another-module"))
    with pytest.raises(TrustRootLocked, match="belongs to module"):
        ZymkeyTrustRoot.open(tmp_path / "home", library_path=standin_library)


def test_zymkey_tampered_module_refuses_to_sign(standin_library: str, tmp_path: Path, zk_state: Path) -> None:
    root = ZymkeyTrustRoot.create(tmp_path / "home", library_path=standin_library)
    (zk_state / "perimeter").write_text("1700000000 0")
    status = root.tamper_status()
    assert status.breached and status.first_breach == (1700000000, 0)
    with pytest.raises(TamperDetected, match="perimeter breach"):
        root.sign_digest(DIGEST)


def test_zymkey_module_cannot_be_switched_to_another_library(standin_library: str, tmp_path: Path) -> None:
    zk.load_module(standin_library)
    with pytest.raises(TrustRootUnavailable, match="already loaded"):
        zk.load_module(str(tmp_path / "other.so"))


def test_zymkey_unimplemented_standin_call_fails_clearly(standin_library: str, zk_state: Path) -> None:
    client = zk.load_module(standin_library).Zymkey()
    with pytest.raises(AssertionError, match="-95"):
        client.led_on()


def test_independent_ecdsa_rejects_a_forged_signature(backend: tuple[TrustRoot, Reopen]) -> None:
    """Sanity of the independent checker used above: it does reject a bad signature."""
    root, _ = backend
    sig = root.sign_digest(DIGEST)
    with pytest.raises(BadSignatureError):
        VerifyingKey.from_string(root.public_key(), curve=SECP256k1).verify_digest(sig[:64], bytes(32))
