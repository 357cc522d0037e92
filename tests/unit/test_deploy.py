"""The deployment files: Dockerfile, Ray cluster-launcher configs (cluster/*.yaml), KubeRay manifests
(cluster/kuberay/*.yaml) and the commands they and cluster/README.md show.

Nothing here needs Docker, a cloud account or a Kubernetes cluster: the launcher configs are checked with the
cluster-config schema and checks of the installed ray, the pod templates with Kubernetes' own schemas
(kubernetes-validate), the Dockerfile with hadolint, and every command against the repository.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
CLUSTER = REPO / "cluster"
GUIDE = CLUSTER / "README.md"
LAUNCHER_CONFIGS = sorted(CLUSTER.glob("*.yaml"))
KUBERAY_MANIFESTS = sorted((CLUSTER / "kuberay").glob("*.yaml"))
K8S_VERSION = "1.33"  # a recent Kubernetes; kubernetes-validate ships its schemas
CREDENTIAL_ENV = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"}

EXPECTED = [
    DOCKERFILE,
    DOCKERIGNORE,
    GUIDE,
    CLUSTER / "aws-gpu.yaml",
    CLUSTER / "gcp-gpu.yaml",
    CLUSTER / "kuberay" / "raycluster.yaml",
    CLUSTER / "kuberay" / "rayjob.yaml",
]


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def _pyproject() -> dict[str, Any]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def _load_yaml_docs(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]


def test_deployment_files_exist():
    missing = [_rel(p) for p in EXPECTED if not p.is_file()]
    assert not missing, f"missing deployment files: {missing}"


# ----------------------------------------------------------------------------------------------------------------
# Dockerfile


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, with continuation lines joined and comments dropped."""
    instructions, buf = [], ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.strip().partition(" ")
        instructions.append((word.upper(), rest.strip()))
        buf = ""
    if buf.strip():
        word, _, rest = buf.strip().partition(" ")
        instructions.append((word.upper(), rest.strip()))
    return instructions


def _documented_image() -> str:
    """The image the Dockerfile documents in its `# image: REF` comment."""
    refs = re.findall(r"^#\s*image:\s*(\S+)\s*$", DOCKERFILE.read_text(encoding="utf-8"), flags=re.MULTILINE)
    assert len(refs) == 1, f"Dockerfile: expected exactly one '# image: REGISTRY/NAME:TAG' comment, found {refs}"
    return refs[0]


def _base_image() -> str:
    froms = [args for word, args in _dockerfile_instructions() if word == "FROM"]
    assert froms, "Dockerfile: no FROM"
    return froms[-1].split()[0]  # the final stage's base ("FROM image AS name")


def _labels() -> dict[str, str]:
    labels: dict[str, str] = {}
    for word, args in _dockerfile_instructions():
        if word == "LABEL":
            for token in shlex.split(args):
                key, _, value = token.partition("=")
                labels[key] = value
    return labels


def test_dockerfile_base_image_matches_installed_ray_and_pyproject():
    import ray
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet

    base = _base_image()
    match = re.fullmatch(r"rayproject/ray:(\d+)\.(\d+)\.(\d+)-py3(\d+)-cu(\d+)", base)
    assert match, f"Dockerfile: base image {base!r} is not an official rayproject/ray:X.Y.Z-py3N-cuNNN image"
    major, minor, patch, py_minor, _ = match.groups()
    installed = ray.__version__.split(".")
    assert [major, minor] == installed[:2], (
        f"Dockerfile: base image has Ray {major}.{minor}.{patch}, the installed ray is {ray.__version__}: "
        "the cluster's Ray must equal the Ray that submits to it"
    )
    project = _pyproject()["project"]
    python = f"3.{py_minor}"
    assert SpecifierSet(project["requires-python"]).contains(python), (
        f"Dockerfile: base image has Python {python}, pyproject requires-python is {project['requires-python']}"
    )
    ray_reqs = [Requirement(d) for d in project["dependencies"] if Requirement(d).name == "ray"]
    assert ray_reqs, "pyproject: no ray dependency"
    version = f"{major}.{minor}.{patch}"
    assert ray_reqs[0].specifier.contains(version), (
        f"Dockerfile: base image has Ray {version} but pyproject pins {ray_reqs[0]}: `pip install .` would replace it"
    )


def test_dockerfile_documents_its_image_tag():
    ref = _documented_image()
    match = re.fullmatch(r"[\w.-]+(?::\d+)?/[\w./-]+:([\w][\w.-]*)", ref)
    assert match, f"Dockerfile: documented image {ref!r} is not REGISTRY/NAME:TAG"
    tag = match.group(1)
    version = _pyproject()["project"]["version"]
    assert tag == version, f"Dockerfile: documented tag {tag!r} differs from the project version {version!r}"
    label = _labels().get("org.opencontainers.image.version")
    assert label == version, (
        f"Dockerfile: LABEL org.opencontainers.image.version={label!r}, project version {version!r}"
    )


def test_dockerfile_final_user_is_not_root():
    users = [args for word, args in _dockerfile_instructions() if word == "USER"]
    assert users, "Dockerfile: no USER instruction; the image would run as its base image's user"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}, f"Dockerfile: the final USER is {users[-1]!r}"


SECRET_NAME = re.compile(r"SECRET|PASSWORD|PASSWD|TOKEN|API_?KEY|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL", re.IGNORECASE)
SECRET_VALUE = re.compile(
    r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b|-----BEGIN [A-Z ]*PRIVATE KEY-----|\bgh[pousr]_[A-Za-z0-9]{30,}"
)


def _env_and_args() -> Iterator[tuple[str, str, str]]:
    for word, args in _dockerfile_instructions():
        if word == "ARG":
            name, _, value = args.partition("=")
            yield word, name.strip(), value.strip()
        elif word == "ENV":
            tokens = shlex.split(args)
            if tokens and "=" not in tokens[0]:  # legacy form: ENV NAME value...
                yield word, tokens[0], " ".join(tokens[1:])
            else:
                for token in tokens:
                    name, _, value = token.partition("=")
                    yield word, name, value


def test_dockerfile_env_and_arg_hold_no_secrets():
    found = list(_env_and_args())
    assert found, "Dockerfile: no ENV/ARG found (parser out of step with the file?)"
    for word, name, value in found:
        # Build arguments and ENV values stay readable in the image's history: credentials come at run time.
        assert not SECRET_NAME.search(name), f"Dockerfile: {word} {name} looks like a credential"
        assert not SECRET_VALUE.search(value), f"Dockerfile: {word} {name} holds something that looks like a secret"


def test_dockerignore_keeps_what_pip_install_needs():
    patterns = {
        line.strip().rstrip("/")
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    }
    for needed in ("megl_ray", "pyproject.toml", "README.md", "*", "**"):
        assert needed not in patterns, f".dockerignore excludes {needed!r}, which `pip install .` needs"
    assert ".git" in patterns, ".dockerignore should exclude .git"


# ----------------------------------------------------------------------------------------------------------------
# Ray cluster-launcher configs (ray up)


def test_launcher_configs_found():
    assert {p.name for p in LAUNCHER_CONFIGS} >= {"aws-gpu.yaml", "gcp-gpu.yaml"}


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_launcher_config_passes_ray_validation(path):
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(config, dict), f"{_rel(path)}: not a mapping"
    # Ray's JSON schema on the file as written, reporting every bad key by its path ...
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text(encoding="utf-8"))
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        pytest.fail(
            f"{_rel(path)} does not match Ray's cluster schema:\n"
            + "\n".join(f"  {'.'.join(map(str, e.absolute_path)) or '<top level>'}: {e.message}" for e in errors)
        )
    # ... then what `ray up` does before launching: merge the provider's defaults, check docker and node types.
    rejected = None
    try:
        validate_config(prepare_config(copy.deepcopy(config)))
    except Exception as err:  # noqa: BLE001 - report whatever Ray rejects, with the file
        rejected = f"{type(err).__name__}: {err}"
    if rejected:
        pytest.fail(f"{_rel(path)}: Ray's validate_config rejects it: {rejected}")


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_launcher_config_has_cpu_head_and_autoscaling_gpu_workers(path):
    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert not head["resources"].get("GPU"), f"{_rel(path)}: the head node should be a CPU node"
    gpu = [name for name, t in types.items() if name != config["head_node_type"] and t["resources"].get("GPU", 0) > 0]
    assert gpu, f"{_rel(path)}: no worker node type with GPUs"
    for name in gpu:
        t = types[name]
        assert t.get("min_workers", 0) < t.get("max_workers", 0), f"{_rel(path)}: {name} does not autoscale"
    assert config.get("docker", {}).get("image"), f"{_rel(path)}: no docker.image"


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_launcher_config_passes_no_credentials_to_containers(path):
    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    docker = config.get("docker", {})
    options = [
        *docker.get("run_options", []),
        *docker.get("head_run_options", []),
        *docker.get("worker_run_options", []),
    ]
    for t in config["available_node_types"].values():
        options += t.get("docker", {}).get("worker_run_options", [])
    for option in options:
        tokens = shlex.split(option)
        for i, token in enumerate(tokens):
            value = token.split("=", 1)[1] if token.startswith(("--env=", "-e=")) else None
            if token in ("--env", "-e") and i + 1 < len(tokens):
                value = tokens[i + 1]
            if value is not None:
                assert value.split("=", 1)[0] not in CREDENTIAL_ENV, (
                    f"{_rel(path)}: docker run option {option!r} puts a credential in the file; "
                    "use instance profiles / service accounts or an env file written on the node"
                )
    assert not SECRET_VALUE.search(path.read_text(encoding="utf-8")), (
        f"{_rel(path)}: holds something that looks like a secret"
    )


# ----------------------------------------------------------------------------------------------------------------
# KubeRay manifests


def _cluster_specs(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]


def _pod_templates(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    spec = _cluster_specs(doc)
    base = "spec" if doc["kind"] == "RayCluster" else "spec.rayClusterSpec"
    templates = [(f"{base}.headGroupSpec.template", spec["headGroupSpec"]["template"])]
    for i, group in enumerate(spec.get("workerGroupSpecs") or []):
        templates.append((f"{base}.workerGroupSpecs[{i}].template", group["template"]))
    return templates


def _kuberay_docs() -> list[tuple[Path, dict[str, Any]]]:
    return [(path, doc) for path in KUBERAY_MANIFESTS for doc in _load_yaml_docs(path)]


def test_kuberay_manifests_found():
    kinds = {doc.get("kind") for _, doc in _kuberay_docs()}
    assert kinds >= {"RayCluster", "RayJob"}, f"cluster/kuberay: expected a RayCluster and a RayJob, found {kinds}"


@pytest.mark.parametrize("path", KUBERAY_MANIFESTS, ids=lambda p: p.name)
def test_kuberay_manifest_structure(path):
    import ray

    docs = _load_yaml_docs(path)
    assert docs, f"{_rel(path)}: empty"
    for doc in docs:
        where = f"{_rel(path)} ({doc.get('kind')} {doc.get('metadata', {}).get('name')})"
        assert doc.get("apiVersion") == "ray.io/v1", f"{where}: apiVersion must be ray.io/v1"
        assert doc.get("kind") in ("RayCluster", "RayJob"), f"{where}: unexpected kind"
        assert doc.get("metadata", {}).get("name"), f"{where}: metadata.name missing"
        if doc["kind"] == "RayJob":
            assert isinstance(doc["spec"].get("entrypoint"), str), f"{where}: spec.entrypoint missing"
            assert doc["spec"].get("shutdownAfterJobFinishes") is True, f"{where}: shutdownAfterJobFinishes not true"
            assert isinstance(doc["spec"].get("rayClusterSpec"), dict), f"{where}: spec.rayClusterSpec missing"
        spec = _cluster_specs(doc)
        assert str(spec.get("rayVersion")) == ray.__version__, (
            f"{where}: rayVersion {spec.get('rayVersion')!r} differs from the installed ray {ray.__version__}"
        )
        head = spec.get("headGroupSpec", {})
        assert isinstance(head.get("rayStartParams", {}), dict), f"{where}: headGroupSpec.rayStartParams not a map"
        assert all(isinstance(v, str) for v in head.get("rayStartParams", {}).values()), (
            f"{where}: rayStartParams values must be strings"
        )
        assert head.get("template", {}).get("spec", {}).get("containers"), f"{where}: head has no containers"
        groups = spec.get("workerGroupSpecs") or []
        assert groups, f"{where}: no workerGroupSpecs"
        gpu_groups = 0
        for group in groups:
            name = group.get("groupName")
            assert name, f"{where}: a worker group has no groupName"
            counts = [group.get(k) for k in ("minReplicas", "replicas", "maxReplicas")]
            assert all(isinstance(c, int) for c in counts), f"{where}: {name}: min/replicas/max must be integers"
            assert counts[0] <= counts[1] <= counts[2], f"{where}: {name}: need minReplicas <= replicas <= maxReplicas"
            pod = group["template"]["spec"]
            gpus = [c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu") for c in pod["containers"]]
            if any(gpus):
                gpu_groups += 1
                tolerated = {t.get("key") for t in pod.get("tolerations", [])}
                assert "nvidia.com/gpu" in tolerated, (
                    f"{where}: {name} asks for GPUs but does not tolerate nvidia.com/gpu"
                )
        assert gpu_groups, f"{where}: no worker group with an nvidia.com/gpu limit"


@pytest.mark.parametrize("path", KUBERAY_MANIFESTS, ids=lambda p: p.name)
def test_kuberay_pod_templates_match_kubernetes_schema(path):
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="pip install kubernetes-validate (dev extra)"
    )

    errors = []
    for doc in _load_yaml_docs(path):
        for where, template in _pod_templates(doc):
            # The CRDs' own schemas are not in kubernetes-validate; their pod templates are plain PodTemplateSpecs.
            obj = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "check"}, "template": template}
            try:
                kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
            except kubernetes_validate.ValidationError as err:
                key = ".".join(map(str, list(err.path)[1:]))  # drop the wrapper's "template"
                errors.append(f"  {where}.{key}: {err.message}")
    if errors:
        pytest.fail(f"{_rel(path)}: pod templates do not match Kubernetes {K8S_VERSION}:\n" + "\n".join(errors))


@pytest.mark.parametrize("path", KUBERAY_MANIFESTS, ids=lambda p: p.name)
def test_kuberay_credentials_come_from_secrets(path):
    for doc in _load_yaml_docs(path):
        for where, template in _pod_templates(doc):
            for container in template["spec"]["containers"]:
                for env in container.get("env", []):
                    if env["name"] in CREDENTIAL_ENV:
                        assert "value" not in env and "secretKeyRef" in env.get("valueFrom", {}), (
                            f"{_rel(path)}: {where} container {container['name']}: {env['name']} must come from "
                            "a Secret (valueFrom.secretKeyRef), not a literal value"
                        )
    assert not SECRET_VALUE.search(path.read_text(encoding="utf-8")), (
        f"{_rel(path)}: holds something that looks like a secret"
    )


# ----------------------------------------------------------------------------------------------------------------
# Images and commands across the files


def _cluster_images() -> list[tuple[str, str]]:
    images = []
    for path in LAUNCHER_CONFIGS:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
        docker = config.get("docker", {})
        for key in ("image", "head_image", "worker_image"):
            if docker.get(key):
                images.append((_rel(path), docker[key]))
        for t in config["available_node_types"].values():
            if t.get("docker", {}).get("worker_image"):
                images.append((_rel(path), t["docker"]["worker_image"]))
    for path, doc in _kuberay_docs():
        for where, template in _pod_templates(doc):
            for container in template["spec"].get("initContainers", []) + template["spec"]["containers"]:
                images.append((f"{_rel(path)} {where}", container["image"]))
    return images


def test_cluster_files_run_the_documented_image():
    expected = _documented_image()
    images = _cluster_images()
    files = {where.split()[0] for where, _ in images}
    assert files >= {_rel(p) for p in LAUNCHER_CONFIGS + KUBERAY_MANIFESTS}, "a cluster file names no image"
    wrong = [(where, image) for where, image in images if image != expected]
    assert not wrong, f"images that differ from the Dockerfile's documented {expected}: {wrong}"


def _logical_lines(lines: list[str]) -> list[str]:
    """Shell lines with backslash continuations joined."""
    out, buf = [], ""
    for line in lines:
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
        else:
            out.append(buf + line)
            buf = ""
    if buf:
        out.append(buf)
    return out


def _text_lines(path: Path) -> list[str]:
    """The lines that may hold commands: a YAML file's comments, every line of a Markdown file."""
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix == ".yaml":
        lines = [line.strip()[1:] for line in lines if line.strip().startswith("#")]
    return _logical_lines(lines)


def _python_commands() -> list[tuple[str, str]]:
    """Every `python -m ...` command the deployment files show: (where, command)."""
    commands = []
    for path in [*LAUNCHER_CONFIGS, *KUBERAY_MANIFESTS, GUIDE]:
        for line in _text_lines(path):
            for match in re.finditer(r"\bpython3? -m \S+", line):
                commands.append((_rel(path), line[match.start() :]))
    for path, doc in _kuberay_docs():
        if doc["kind"] == "RayJob":
            commands.append((f"{_rel(path)} spec.entrypoint", doc["spec"]["entrypoint"]))
    return commands


def _parse_command(command: str) -> tuple[str, str | None, list[str]]:
    """(module, --config value, key=value overrides) of `python -m MODULE [--config FILE] [key=value ...]`."""
    tokens = shlex.split(command, comments=True)
    module, rest = tokens[2], tokens[3:]
    config, overrides = None, []
    i = 0
    while i < len(rest):
        token = rest[i]
        if token in ("&&", "||", ";", "|", "&"):
            break
        if token == "--config" and i + 1 < len(rest):
            config = rest[i + 1]
            i += 2
            continue
        if token.startswith("--config="):
            config = token.split("=", 1)[1]
        elif "=" in token and not token.startswith("-"):
            overrides.append(token)
        i += 1
    return module, config, overrides


def _train_commands() -> list[tuple[str, str, str | None, list[str]]]:
    parsed = [(where, *_parse_command(command)) for where, command in _python_commands()]
    return [p for p in parsed if p[1].startswith("megl_ray")]


def test_every_deployment_file_shows_a_training_command():
    shown = {where.split()[0] for where, *_ in _train_commands()}
    expected = {_rel(p) for p in [*LAUNCHER_CONFIGS, *KUBERAY_MANIFESTS, GUIDE]}
    assert shown >= expected, f"files without a `python -m megl_ray.train --config ...` command: {expected - shown}"


def test_ray_job_submit_commands_run_a_megl_module():
    for path in [*LAUNCHER_CONFIGS, *KUBERAY_MANIFESTS, GUIDE]:
        for line in _text_lines(path):
            if re.match(r"\s*ray job submit\b", line):
                assert "--address" in line, f"{_rel(path)}: `ray job submit` without --address: {line.strip()}"
                assert re.search(r"\s--\s+python3? -m megl_ray\.", line), (
                    f"{_rel(path)}: `ray job submit` should run `-- python -m megl_ray...`: {line.strip()}"
                )


def test_commands_name_config_files_that_exist_and_load():
    from megl_ray.config import load_config
    from megl_ray.errors import ConfigError

    commands = _train_commands()
    assert commands
    for where, module, config, overrides in commands:
        if module == "megl_ray.train":
            assert config, f"{where}: `python -m {module}` without --config"
        if config is None:
            continue
        path = REPO / config
        assert not Path(config).is_absolute() and path.is_file(), f"{where}: config {config} is not in the repository"
        try:
            load_config(path, overrides)
        except ConfigError as err:
            pytest.fail(f"{where}: {config} with {overrides} is not a valid configuration: {err}")


def test_commands_name_modules_that_exist():
    # megl_ray.train is the Ray Train entry point; this fails until megl_ray/train.py is in the repository.
    commands = _train_commands()
    assert commands
    for where, module, _, _ in commands:
        parts = module.split(".")
        candidates = [REPO.joinpath(*parts).with_suffix(".py"), REPO.joinpath(*parts, "__main__.py")]
        assert any(c.is_file() for c in candidates), f"{where}: `python -m {module}`: no {_rel(candidates[0])}"
