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
import functools
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


@functools.cache
def _class_source(klass) -> str:
    try:
        return inspect.getsource(klass)
    except (OSError, TypeError):
        return ''


def _sets_on_self(cls, name: str) -> bool:
    """Whether the code of ``cls`` or a base of it assigns ``self.name``
    (an instance attribute, which a class has no attribute for)."""
    pattern = re.compile(r'\bself\.' + re.escape(name) + r'\s*(=|:)')
    for klass in cls.__mro__:
        if klass is not object and pattern.search(_class_source(klass)):
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


def source_names(source: str):
    """(private names the code uses or defines as methods, private names
    it defines itself)."""
    tree = ast.parse(source)
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
    assert {'engineio_server', 'engineio_socket', 'socketio_server',
            'socketio_manager', 'socketio_packet'} <= set(MODULES)


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


def undeclared(source: str, names, classes) -> list:
    """What in ``source`` breaks the rule: a private name used is declared
    (in ``names``), or defined in the source and not one of ``classes``
    (an upstream name overridden without saying so)."""
    used, own = source_names(source)
    problems = []
    for attr in sorted(used - set(names)):
        owners = [c.__qualname__ for c in classes if upstream_has(c, attr)]
        if owners:
            problems.append(f'{attr} (upstream {owners[0]}) undeclared')
        elif attr not in own:
            problems.append(f'{attr} neither declared nor defined here')
    return problems


@pytest.mark.parametrize('name', MODULES)
def test_no_undeclared_private_name(name):
    """A private name in the module's source is declared, or its own (and
    then not an upstream one it overrides without saying so)."""
    module = _module(name)
    problems = undeclared(inspect.getsource(module),
                          [attr for _, attr in declared(module)],
                          upstream_classes(module))
    assert not problems, f'server/upstream/{name}.py: {problems}'


def test_the_scan_finds_undeclared_names():
    """The scan itself: an override, a call and a read of upstream private
    names, and a private name from nowhere, are each caught."""
    import engineio
    source = '''
class Engine(engineio.AsyncServer):
    _mine = 1

    async def _handle_connect(self, environ, transport):
        self._trigger_event('connect')
        return self._async, self._mine, self._gone
'''
    assert undeclared(source, ['_trigger_event'], [engineio.AsyncServer]) == [
        '_async (upstream AsyncServer) undeclared',
        '_gone neither declared nor defined here',
        '_handle_connect (upstream AsyncServer) undeclared']


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


def _upstream_privates():
    """Private names of the upstream classes the package overrides."""
    names = set()
    for name in MODULES:
        for cls in upstream_classes(_module(name)):
            for klass in cls.__mro__:
                if klass is object:
                    continue
                names.update(n for n in vars(klass) if _private(n))
                names.update(n for n in re.findall(
                    r'\bself\.(_\w+)\s*[=:]', _class_source(klass))
                    if _private(n))
    return names


def _subclasses_upstream(tree) -> list:
    """Classes in ``tree`` with a python-engineio / python-socketio base."""
    upstream = {alias.asname or alias.name
                for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                and (node.module or '').split('.')[0] in ('engineio',
                                                           'socketio')
                for alias in node.names}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            for base in node.bases:
                text = ast.unparse(base)
                if text.split('.')[0] in upstream | {'engineio', 'socketio'}:
                    found.append(f'{node.name}({text})')
    return found


def test_nothing_outside_the_package_reaches_upstream_internals():
    """Outside server/upstream/, no module subclasses a python-engineio or
    python-socketio class or uses a private name of the upstream classes
    the package overrides (a name of its own excepted)."""
    privates = _upstream_privates()
    problems = []
    for path in sorted((ROOT / 'server').rglob('*.py')):
        if 'upstream' in path.relative_to(ROOT / 'server').parts:
            continue
        source = path.read_text()
        used, own = source_names(source)
        where = path.relative_to(ROOT)
        problems += [f'{where}: {attr}' for attr in sorted(
            (used & privates) - own)]
        problems += [f'{where}: subclasses {cls}'
                     for cls in _subclasses_upstream(ast.parse(source))]
    assert not problems, (
        'upstream internals used outside server/upstream/: '
        f'{problems}')
