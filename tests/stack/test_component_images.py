"""The component images' pure parts: package lists, tags, pip and debootstrap argv, image configs, the
binfmt_misc check and the `docker save` archive. Building and running them is e2e/stack/test_images_e2e.py."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import tarfile
from pathlib import Path

import pytest

import trustcap
from trustcap.cli._stack_images import arches_for
from trustcap.stack import component_images as ci
from trustcap.stack import images, paths

REPO = paths.repo_root()
#: Which Debian package brings each command a component runs inside its image.
COMMAND_PACKAGES = {"nft": "nftables", "ip": "iproute2", "sysctl": "procps", "dnsmasq": "dnsmasq-base",
                    "nsenter": "util-linux"}
ESSENTIAL = {"util-linux"}  # in every minbase tree
#: Files whose commands run on the host, not in the component's image: the boot container's host side moves
#: the link into the container (0053), and the boot-image builder runs on the build machine.
HOST_SIDE = {"netboot/container.py", "netboot/image"}
_COMMAND = re.compile(r'(?:_run|subprocess\.\w+)\(\s*\[\s*"([\w.-]+)"|shutil\.which\("([\w.-]+)"\)|\[\s*"(nsenter)"')


def _commands(component: str) -> set[str]:
    found = set()
    for py in (REPO / component).rglob("*.py"):
        rel = py.relative_to(REPO).as_posix()
        if any(rel == h or rel.startswith(h + "/") for h in HOST_SIDE):
            continue
        for m in _COMMAND.finditer(py.read_text()):
            found.add(next(g for g in m.groups() if g))
    return found


@pytest.mark.parametrize("component", sorted(ci.COMPONENTS))
def test_every_command_a_component_runs_has_its_package(component: str) -> None:
    commands = _commands(component)
    unknown = commands - COMMAND_PACKAGES.keys()
    assert not unknown, f"add the Debian package of {unknown} to COMMAND_PACKAGES and to COMPONENTS[{component!r}]"
    needed = {COMMAND_PACKAGES[c] for c in commands} - ESSENTIAL
    assert needed == set(ci.COMPONENTS[component].apt)


def test_the_command_scan_sees_the_gateways_commands() -> None:
    """Positive control for the scan above: it must find what egress.py runs."""
    assert {"nft", "ip", "sysctl", "nsenter"} <= _commands("gateway")
    assert "dnsmasq" in _commands("netboot")


def test_one_tree_carries_the_union_sorted() -> None:
    assert ci.apt_packages() == ("dnsmasq-base", "iproute2", "nftables", "procps", "python3")


@pytest.mark.parametrize("component", sorted(ci.COMPONENTS))
def test_entrypoint_is_the_venv_python_running_a_real_main(component: str) -> None:
    argv = ci.entrypoint(component)
    assert argv[:2] == ["/opt/trustcap/venv/bin/python", "-m"]
    assert importlib.util.find_spec(f"{argv[2]}.__main__") is not None


@pytest.mark.parametrize(("arch", "host", "expected"), [
    pytest.param("amd64", "amd64", ["trustcap/gateway:1.2.3", "trustcap/gateway:latest"], id="native-amd64"),
    pytest.param("arm64", "arm64", ["trustcap/gateway:1.2.3", "trustcap/gateway:latest"], id="native-on-a-pi"),
    pytest.param("arm64", "amd64", ["trustcap/gateway:1.2.3-arm64", "trustcap/gateway:latest-arm64"],
                 id="foreign-keeps-arch-in-tag"),
])
def test_image_tags(arch: str, host: str, expected: list[str]) -> None:
    assert ci.image_tags("gateway", "1.2.3", arch, host) == expected


def test_exported_archive_uses_the_charts_tags() -> None:
    assert ci.export_tags("netboot", "1.2.3") == ["trustcap/netboot:1.2.3", "trustcap/netboot:latest"]


def test_version_is_pyprojects(tmp_path: Path) -> None:
    assert ci.package_version(REPO) == trustcap.__version__
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "trustcap"\nversion = "9.8.7"\n')
    assert ci.package_version(tmp_path) == "9.8.7"
    with pytest.raises(ci.StackError, match="source checkout"):
        ci.package_version(tmp_path / "nowhere")


def test_pip_platforms_cover_bookworms_glibc_and_no_newer() -> None:
    plats = ci.pip_platforms("arm64")
    assert "manylinux2014_aarch64" in plats
    assert "manylinux_2_17_aarch64" in plats and "manylinux_2_36_aarch64" in plats
    assert "manylinux_2_37_aarch64" not in plats
    assert all(p.endswith("_aarch64") for p in plats)
    assert all(p.endswith("_x86_64") for p in ci.pip_platforms("amd64"))


def test_pip_argv_fetch_only_wheels_for_the_target(tmp_path: Path) -> None:
    dl = ci.pip_download_argv(tmp_path / "t.whl", tmp_path / "wh", "arm64", tmp_path / "c.txt")
    assert dl[1:5] == ["-P", "-m", "pip", "download"]  # safe-path mode (decision 0001)
    assert "--only-binary=:all:" in dl and dl[dl.index("--python-version") + 1] == "3.11"
    assert dl[dl.index("--abi") + 1] == "cp311" and dl[dl.index("--constraint") + 1] == str(tmp_path / "c.txt")
    inst = ci.pip_install_argv(tmp_path / "t.whl", tmp_path / "wh", tmp_path / "site", "arm64")
    assert "--no-index" in inst and inst[inst.index("--target") + 1] == str(tmp_path / "site")
    assert "--platform" in inst and "manylinux_2_36_aarch64" in inst


@pytest.mark.parametrize(("foreign", "stage"), [pytest.param(True, ["--foreign"], id="foreign-first-stage"),
                                                pytest.param(False, [], id="native")])
def test_debootstrap_argv(foreign: bool, stage: list[str]) -> None:
    argv = images.debootstrap_argv(Path("/r"), ["python3", "nftables"], "arm64", "http://m/debian", foreign=foreign)
    assert argv == ["debootstrap", "--variant=minbase", "--arch=arm64", *stage, "--include=python3,nftables",
                    "bookworm", "/r", "http://m/debian"]


def test_image_config_is_deterministic_and_names_the_arch() -> None:
    a = ci.image_config("gateway", "arm64", "1.0", "ab" * 32, "c1")
    assert a["architecture"] == "arm64" and a["variant"] == "v8" and a["os"] == "linux"
    assert a["config"]["Entrypoint"] == ci.entrypoint("gateway")
    assert a["config"]["Env"][0].startswith("PATH=/opt/trustcap/venv/bin:")
    assert a["rootfs"]["diff_ids"] == ["sha256:" + "ab" * 32]
    assert "variant" not in ci.image_config("gateway", "amd64", "1.0", "ab" * 32, "c1")
    same = ci._config_bytes(ci.image_config("gateway", "arm64", "1.0", "ab" * 32, "c1"))
    assert ci._config_bytes(a) == same
    assert ci._config_bytes(ci.image_config("gateway", "arm64", "1.0", "cd" * 32, "c1")) != same


def _binfmt(tmp_path: Path, status: str | None, entry: str | None) -> Path:
    d = tmp_path / "binfmt_misc"
    d.mkdir()
    if status is not None:
        (d / "status").write_text(status)
    if entry is not None:
        (d / "qemu-aarch64").write_text(entry)
    return d


ENTRY = "{state}\ninterpreter /usr/libexec/qemu-binfmt/aarch64-binfmt-P\nflags: {flags}\noffset 0\n"


@pytest.mark.parametrize(("status", "entry", "fix"), [
    pytest.param(None, None, "mount -t binfmt_misc", id="not-mounted"),
    pytest.param("disabled\n", None, "echo 1 >", id="binfmt-disabled"),
    pytest.param("enabled\n", None, "apt-get install qemu-user-static binfmt-support", id="no-handler"),
    pytest.param("enabled\n", ENTRY.format(state="disabled", flags="PF"), "update-binfmts --enable", id="off"),
    pytest.param("enabled\n", ENTRY.format(state="enabled", flags="P"), "lacks the F flag", id="no-fix-binary"),
])
def test_binfmt_problem_names_the_fix(tmp_path: Path, status: str | None, entry: str | None, fix: str) -> None:
    problem = ci.binfmt_problem("arm64", _binfmt(tmp_path, status, entry))
    assert problem is not None and fix in problem


def test_binfmt_ready(tmp_path: Path) -> None:
    assert ci.binfmt_problem("arm64", _binfmt(tmp_path, "enabled\n", ENTRY.format(state="enabled", flags="PF"))) is None


def test_archive_is_a_docker_save_with_one_shared_layer(tmp_path: Path) -> None:
    layer = tmp_path / "layer.tar"
    with tarfile.open(layer, "w") as t:
        info = tarfile.TarInfo("./etc/hostname")
        data = b"x\n"
        info.size = len(data)
        t.addfile(info, ci._BytesReader(data))
    digest = hashlib.sha256(layer.read_bytes()).hexdigest()
    configs = {c: ci._config_bytes(ci.image_config(c, "arm64", "1.0", digest, "k")) for c in ci.COMPONENTS}
    tags = {c: ci.export_tags(c, "1.0") for c in ci.COMPONENTS}
    out = tmp_path / "a.docker.tar"
    ci.write_archive(out, layer, digest, configs, tags)
    with tarfile.open(out) as t:
        names = t.getnames()
        manifest = json.loads(t.extractfile("manifest.json").read())  # type: ignore[union-attr]
        assert names.count(f"{digest}/layer.tar") == 1
        assert t.extractfile(f"{digest}/layer.tar").read() == layer.read_bytes()  # type: ignore[union-attr]
        for entry in manifest:
            cfg = t.extractfile(entry["Config"]).read()  # type: ignore[union-attr]
            assert entry["Config"] == hashlib.sha256(cfg).hexdigest() + ".json"  # the image ID docker will use
            assert json.loads(cfg)["architecture"] == "arm64"
            assert entry["Layers"] == [f"{digest}/layer.tar"]
    assert sorted(t for e in manifest for t in e["RepoTags"]) == sorted(t for ts in tags.values() for t in ts)


def test_source_hash_follows_the_sources(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text('[tool.setuptools]\npackage-dir = { "trustcap" = "pkg" }\n')
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("A = 1\n")
    first = ci.source_hash(tmp_path)
    (tmp_path / "pkg" / "__pycache__").mkdir()
    (tmp_path / "pkg" / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"junk")
    assert ci.source_hash(tmp_path) == first
    (tmp_path / "pkg" / "a.py").write_text("A = 2\n")
    assert ci.source_hash(tmp_path) != first


@pytest.mark.parametrize(("choice", "expected"), [
    pytest.param(None, ["amd64"], id="default-host"), pytest.param("arm64", ["arm64"], id="one"),
    pytest.param("all", ["amd64", "arm64"], id="all"),
])
def test_cli_arches(choice: str | None, expected: list[str]) -> None:
    assert arches_for(choice, "amd64") == expected


def test_unknown_arch_is_refused_before_any_work() -> None:
    with pytest.raises(ci.StackError, match="unknown architecture 'riscv64'"):
        ci.build(["riscv64"], client=object())
