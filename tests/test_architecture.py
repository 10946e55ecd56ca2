"""The house plan holds: layers import downwards only, cores are plain Python, services do
not queue tasks, no import circles, one name for one thing. Each check also runs on a
planted tree, to show it fails when the plan is broken."""

import json
import subprocess
import sys
import textwrap

import pytest

from tests import architecture

# Where Django itself makes an import wait: an app's ready() runs once models are loaded, and
# gunicorn's hooks run before Django is set up.
DJANGO_DEFERS = {"search.apps", "portal.gunicorn"}
# Django's documented way to load Celery with the project (``celery_app`` in portal/__init__.py),
# and the command-line entry points every runnable module names ``main``.
ALLOWED_RENAMES = {("portal", "portal.celery")}
ALLOWED_TWINS = {"main"}


@pytest.fixture(scope="module")
def imports():
    return architecture.all_imports()


def test_no_module_imports_a_higher_layer(imports):
    assert architecture.upward_imports(imports) == []


def test_imports_inside_functions_only_defer_heavy_libraries(imports):
    found = [line for line in architecture.deferred_project_imports(imports)
             if line.split(":")[0] not in DJANGO_DEFERS]
    assert found == []


def test_services_never_import_tasks(imports):
    assert architecture.tasks_queued_by_services(imports) == []


def test_modules_import_each_other_in_no_circle(imports):
    assert architecture.import_circles(imports) == []


def test_project_modules_are_imported_under_their_own_names(imports):
    found = [imp for imp in imports if imp.renamed and architecture.layer(imp.target)
             and (imp.module, imp.target) not in ALLOWED_RENAMES]
    assert found == []


def test_no_public_function_or_class_is_defined_in_two_modules():
    twins = {name: where for name, where in architecture.name_twins().items() if name not in ALLOWED_TWINS}
    assert twins == {}


def core_modules(root=architecture.ROOT):
    return sorted(architecture.module_name(path, root) for core in architecture.CORES
                  for path in (root / core.replace(".", "/")).rglob("*.py"))


def test_every_pure_core_imports_in_a_fresh_interpreter_without_django_or_an_app():
    script = textwrap.dedent("""
        import importlib, json, sys
        offenders = {}
        for name in sys.argv[1:]:
            before = set(sys.modules)
            importlib.import_module(name)
            new = set(sys.modules) - before
            bad = sorted(m for m in new if m.split(".")[0] in ("django", "rest_framework", "celery")
                         or (m.split(".")[0] in ("portal", "search", "embeddings", "evaluation")
                             and ".core" not in m and m not in ("search", "embeddings", "evaluation")))
            if bad:
                offenders[name] = bad[:5]
        print(json.dumps(offenders))
    """)
    modules = core_modules()
    assert len(modules) >= 15, modules  # the encoder, runtimes, training, backends, metrics ...
    out = subprocess.run([sys.executable, "-c", script, *modules], cwd=architecture.ROOT,
                         capture_output=True, text=True, timeout=300, env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout) == {}


# --- The checks fail on a planted tree ----------------------------------------------


@pytest.fixture
def planted(tmp_path):
    def plant(files: dict[str, str]):
        for name in ("embeddings", "embeddings/core", "search", "search/core", "evaluation", "evaluation/core", "portal"):
            (tmp_path / name).mkdir(parents=True, exist_ok=True)
            (tmp_path / name / "__init__.py").write_text("")
        for name, text in files.items():
            (tmp_path / name).write_text(textwrap.dedent(text))
        return architecture.all_imports(tmp_path)
    return plant


def test_an_upward_import_is_found(planted):
    imports = planted({"search/queries.py": "from evaluation import services\n",
                       "evaluation/services.py": "x = 1\n"})
    assert architecture.upward_imports(imports) == ["search.queries:1 imports evaluation.services (search → evaluation)"]


def test_a_core_importing_django_or_an_app_is_found(planted):
    imports = planted({"search/core/index.py": "import django.db\nfrom search import models\n",
                       "search/models.py": ""})
    assert architecture.upward_imports(imports) == [
        "search.core.index:1 imports django.db (a core imports no Django)",
        "search.core.index:2 imports search.models (core → search)",
    ]


def test_an_import_inside_a_function_to_dodge_a_loop_is_found(planted):
    imports = planted({"search/ingest.py": "def f():\n    import torch\n    from embeddings import services\n",
                       "embeddings/services.py": ""})
    assert architecture.deferred_project_imports(imports) == ["search.ingest:3 imports embeddings.services inside a function"]


def test_a_service_queueing_a_task_is_found(planted):
    imports = planted({"search/curation.py": "from search.tasks import embed\n",
                       "search/views.py": "from search import tasks\n", "search/tasks.py": ""})
    assert architecture.tasks_queued_by_services(imports) == ["search.curation:1 imports search.tasks"]


def test_an_import_circle_is_found(planted):
    imports = planted({"search/a.py": "from search import b\n", "search/b.py": "from search import a\n"})
    assert architecture.import_circles(imports) == [["search.a", "search.b"]]


def test_a_name_defined_twice_is_found(planted, tmp_path):
    planted({"search/a.py": "def sync_indices():\n    pass\n", "embeddings/b.py": "def sync_indices():\n    pass\n",
             "search/c.py": "def _private():\n    pass\n", "embeddings/d.py": "def _private():\n    pass\n"})
    assert architecture.name_twins(tmp_path) == {"sync_indices": ["embeddings.b", "search.a"]}
