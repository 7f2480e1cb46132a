"""The drift test of server/upstream/: the python-engineio and
python-socketio code Postbox overrides is still what it was written
against.

For every module of the package (see its ``__init__`` for the convention):
the private upstream names it declares (``PRIVATE_NAMES``) exist in the
installed versions; its source uses no private upstream name it does not
declare; the upstream code it copies or mirrors (``COPIED``) hashes as it
did. And the installed versions are those ``setup.cfg`` pins. Fast: no
server is started.
"""
import ast
import configparser
import hashlib
import importlib
import importlib.metadata
import inspect
import pkgutil
import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement

import server.upstream

ROOT = Path(__file__).resolve().parent.parent
PINNED = ('python-engineio', 'python-socketio')
MODULES = sorted(
    info.name for info in pkgutil.iter_modules(server.upstream.__path__))


def _module(name):
    return importlib.import_module(f'server.upstream.{name}')


def resolve(dotted: str):
    """The object a dotted name such as ``engineio.AsyncServer._x`` names:
    the longest importable module prefix, then attributes. Raises
    LookupError when it does not exist."""
    parts = dotted.split('.')
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module('.'.join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            try:
                obj = inspect.getattr_static(obj, attr)
            except AttributeError:
                raise LookupError(dotted) from None
            if isinstance(obj, (staticmethod, classmethod)):
                obj = obj.__func__
        return obj
    raise LookupError(dotted)


def _sets_on_self(cls, name: str) -> bool:
    """Whether the code of ``cls`` or a base of it assigns ``self.name``
    (an instance attribute, which a class has no attribute for)."""
    pattern = re.compile(r'\bself\.' + re.escape(name) + r'\s*(=|:)')
    for klass in cls.__mro__:
        if klass is object:
            continue
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        if pattern.search(source):
            return True
    return False


def upstream_has(owner, name: str) -> bool:
    """Whether the upstream class ``owner`` has attribute ``name``, as a
    class attribute or one its code sets on instances."""
    if not inspect.isclass(owner):
        return hasattr(owner, name)
    return hasattr(owner, name) or _sets_on_self(owner, name)


def declared(module):
    """The module's declared private names as (owner, name) pairs."""
    pairs = []
    for dotted in module.PRIVATE_NAMES:
        owner, _, name = dotted.rpartition('.')
        pairs.append((owner, name))
    return pairs


def _private(name: str) -> bool:
    return name.startswith('_') and not name.startswith('__')


def source_names(module):
    """(private names the module's code uses or defines as methods,
    private names the module itself defines)."""
    tree = ast.parse(inspect.getsource(module))
    used, own = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            used.add(node.attr)
            if isinstance(node.ctx, ast.Store):
                own.add(node.attr)
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    if _private(item.name):
                        used.add(item.name)
                        own.add(item.name)
                elif isinstance(item, (ast.Assign, ast.AnnAssign)):
                    targets = item.targets if isinstance(
                        item, ast.Assign) else [item.target]
                    for target in targets:
                        if isinstance(target, ast.Name):
                            own.add(target.id)
                            if target.id == '__slots__':
                                own.update(ast.literal_eval(item.value))
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef,
                               ast.ClassDef)):
            own.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            own.add(node.id)
    return used, own


def upstream_classes(module):
    """The upstream classes the module touches: ``UPSTREAM`` and every
    class a declared private name belongs to."""
    classes = [module.UPSTREAM]
    for owner, _ in declared(module):
        obj = resolve(owner)
        if inspect.isclass(obj) and obj not in classes:
            classes.append(obj)
    return classes


def test_the_package_has_modules():
    assert 'socketio_packet' in MODULES


@pytest.mark.parametrize('name', MODULES)
def test_module_follows_the_convention(name):
    module = _module(name)
    for constant in ('UPSTREAM', 'PRIVATE_NAMES', 'COPIED'):
        assert hasattr(module, constant), f'{name} has no {constant}'
    assert inspect.isclass(module.UPSTREAM)
    assert module.UPSTREAM.__module__.split('.')[0] in (
        'engineio', 'socketio', 'aiohttp')
    # named after its upstream class: <package>_<something>
    assert name.split('_')[0] == module.UPSTREAM.__module__.split('.')[0]
    for dotted, why in module.PRIVATE_NAMES.items():
        assert _private(dotted.rpartition('.')[2]), (
            f'{dotted} is not private: no need to declare it')
        assert why, f'{dotted}: say why it is used'


@pytest.mark.parametrize('name', MODULES)
def test_declared_private_names_exist_upstream(name):
    module = _module(name)
    missing = [f'{owner}.{attr}' for owner, attr in declared(module)
               if not upstream_has(resolve(owner), attr)]
    assert not missing, (
        f'server/upstream/{name}.py uses names the installed upstream '
        f'does not have: {missing}')


@pytest.mark.parametrize('name', MODULES)
def test_no_undeclared_private_name(name):
    """A private name in the module's source is declared, or its own (and
    then not an upstream one it overrides without saying so)."""
    module = _module(name)
    used, own = source_names(module)
    names = {attr for _, attr in declared(module)}
    classes = upstream_classes(module)
    problems = []
    for attr in sorted(used - names):
        owners = [c.__qualname__ for c in classes if upstream_has(c, attr)]
        if owners:
            problems.append(f'{attr} (upstream {owners[0]}) undeclared')
        elif attr not in own:
            problems.append(f'{attr} neither declared nor defined here')
    assert not problems, f'server/upstream/{name}.py: {problems}'


@pytest.mark.parametrize('name', MODULES)
def test_copied_upstream_code_is_unchanged(name):
    module = _module(name)
    changed = []
    for dotted, expected in module.COPIED.items():
        source = inspect.getsource(resolve(dotted))
        digest = hashlib.sha256(source.encode()).hexdigest()[:16]
        if digest != expected:
            changed.append(f'{dotted} (now {digest})')
    assert not changed, (
        f'upstream code server/upstream/{name}.py copies or mirrors has '
        f'changed: {changed}; re-read the module against it, then update '
        'the hash (docs/architecture.md, "Upgrading python-engineio / '
        'python-socketio")')


def _pins():
    config = configparser.ConfigParser()
    config.read(ROOT / 'setup.cfg')
    pins = {}
    for line in config['options']['install_requires'].splitlines():
        line = line.split('#')[0].strip()
        if line:
            requirement = Requirement(line)
            pins[requirement.name] = requirement.specifier
    return pins


@pytest.mark.parametrize('project', PINNED)
def test_installed_version_is_within_the_pin(project):
    specifier = _pins()[project]
    # an upper bound on the minor: an upgrade is a decision, not an accident
    assert any(s.operator == '<' for s in specifier), (
        f'{project} has no upper bound in setup.cfg')
    installed = importlib.metadata.version(project)
    assert specifier.contains(installed), (
        f'{project} {installed} is installed; setup.cfg pins {specifier}')
