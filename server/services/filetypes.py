"""What an upload is, from its bytes: the sniffed type (``Sniffer``),
what is refused because a browser or a desktop would run it, and the file
name it is stored and offered under. No I/O: the rules only."""
import codecs
import mimetypes
import re
import unicodedata

import filetype

from server.errors import UnsupportedType

# filetype needs the first 261 bytes; the markup checks look a bit
# further, as far as a browser's own sniffing does (1445 bytes, WHATWG
# MIME Sniffing), after any leading whitespace.
SNIFF_BYTES = 1445
OCTET_STREAM = 'application/octet-stream'
# Pictures a browser shows inline (with nosniff and a sandbox CSP) when
# they have a thumbnail (so their size was checked); every other type is
# only ever served as a download.
INLINE_TYPES = frozenset({'image/png', 'image/jpeg', 'image/gif',
                          'image/webp'})
# Starts of text that a browser (or a careless viewer) would treat as a
# page or a program rather than as plain text.
ACTIVE_TEXT = (b'<!doctype', b'<html', b'<head', b'<body', b'<script',
               b'<svg', b'<?xml', b'<iframe', b'<object', b'<embed',
               b'<meta', b'<style', b'<link', b'#!')
# Sniffed types that run when opened, whatever they are served as:
# refused. Other types not in ``attachment_types`` are kept as
# application/octet-stream.
RUNNABLE_TYPES = frozenset({
    'application/x-msdownload', 'application/x-executable',
    'application/x-shockwave-flash', 'application/x-google-chrome-extension'})
# File name endings that a browser or a desktop runs (or renders as a
# page) when the downloaded file is opened. A file whose name ends in one
# is stored with its type's own ending appended: invoice.html.txt.
RUNNABLE_EXTENSIONS = frozenset({
    'html', 'htm', 'xhtml', 'xht', 'shtml', 'mht', 'mhtml', 'svg', 'svgz',
    'xml', 'xsl', 'xslt', 'js', 'mjs', 'hta', 'htc', 'swf', 'exe', 'com',
    'bat', 'cmd', 'scr', 'pif', 'msi', 'vbs', 'vbe', 'jse', 'wsf', 'wsh',
    'ps1', 'lnk', 'reg', 'jar', 'cpl', 'url', 'desktop', 'command',
    # Less known, as dangerous: compiled help, management consoles, Java
    # Web Start, ClickOnce, disk images that mount and run, shell and
    # setting shortcuts, installers, script components.
    'chm', 'hlp', 'msc', 'jnlp', 'application', 'appref-ms', 'xbap',
    'iso', 'img', 'vhd', 'vhdx', 'scf', 'wsc', 'sct', 'inf', 'gadget',
    'settingcontent-ms', 'library-ms', 'searchconnector-ms', 'msp', 'mst',
    'psm1', 'psd1', 'ps1xml', 'vb', 'ws', 'shtm', 'appx', 'msix',
    'appxbundle', 'msixbundle', 'app', 'pkg', 'dmg'})
# Executables ``filetype`` does not know: Mach-O (both byte orders, 32
# and 64 bits) and universal binaries.
MACH_O = (b'\xcf\xfa\xed\xfe', b'\xce\xfa\xed\xfe', b'\xfe\xed\xfa\xcf',
          b'\xfe\xed\xfa\xce', b'\xca\xfe\xba\xbe')
# Sniffed types that are a variant of an allowed one.
SAME_AS = {'image/apng': 'image/png'}
# Skipped before looking at how a file starts (a byte order mark too).
LEADING = b' \t\r\n\f\v\xef\xbb\xbf'
FILENAME_MAX = 255
# Endings for stored_filename where mimetypes has none or an odd one.
TYPE_EXTENSIONS = {'text/plain': '.txt', OCTET_STREAM: '.bin',
                   'image/jpeg': '.jpg'}


def clean_filename(name) -> str:
    """A display name: the last path component, no control characters,
    at most 255 characters. Never used as a path."""
    if not isinstance(name, str):
        name = ''
    name = unicodedata.normalize('NFC', name)
    name = re.split(r'[/\\]', name)[-1]
    name = ''.join(c for c in name
                   if unicodedata.category(c)[0] != 'C')
    # Cut, then trimmed: Windows drops trailing dots and spaces ("a.html. "
    # opens as a.html), and a cut may leave new ones at the end.
    return name[:FILENAME_MAX].strip().rstrip('. ') or 'file'


def stored_filename(name: str, mime: str) -> str:
    """``name`` (cleaned) as it is kept and offered for download: a name
    ending in a runnable extension gets the ending of the file's real type
    appended (``invoice.html`` holding text becomes ``invoice.html.txt``,
    unknown bytes ``.bin``), so opening the download never runs it."""
    name = clean_filename(name)
    if name.rsplit('.', 1)[-1].lower() in RUNNABLE_EXTENSIONS and \
            '.' in name:
        ending = TYPE_EXTENSIONS.get(mime) or \
            mimetypes.guess_extension(mime) or '.bin'
        name = name[:FILENAME_MAX - len(ending)] + ending
    return name


def refuse_markup(start: bytes, head: bytes):
    """Raise UnsupportedType if a file without magic bytes is a page, an
    image a browser would render (SVG, XML) or a script: ``start`` is its
    beginning after leading whitespace, ``head`` its first bytes."""
    start = start.lstrip(b'\xef\xbb\xbf').lstrip().lower()
    if start.startswith(b'#!'):
        raise UnsupportedType('scripts are not allowed')
    if start.startswith(ACTIVE_TEXT) or (b'\x00' not in head and any(
            marker in head.lower() for marker in ACTIVE_TEXT[:9])):
        raise UnsupportedType('HTML, SVG and XML documents are not allowed')


class Sniffer:
    """The type of an upload, from its bytes as they stream (``feed``),
    final at ``result()``. Keeps at most twice ``SNIFF_BYTES``.

    - Magic bytes (``filetype``): executables are refused; a type in
      ``allowed`` keeps its name, any other is application/octet-stream.
    - No magic bytes: a page, SVG, XML or script is refused (by how it
      starts, after any whitespace); valid UTF-8 without NUL bytes is
      text/plain; anything else is application/octet-stream.
    Raises UnsupportedType as soon as the bytes seen decide a refusal."""

    def __init__(self, allowed):
        self.allowed = allowed
        self.head = bytearray()    # the first SNIFF_BYTES
        self.start = bytearray()   # the first SNIFF_BYTES after whitespace
        self.magic = None          # the type from magic bytes, or ''
        self.checked = False       # markup checked
        self.text = codecs.getincrementaldecoder('utf-8')()
        self.is_text = True

    def feed(self, chunk: bytes):
        if len(self.head) < SNIFF_BYTES:
            self.head += chunk[:SNIFF_BYTES - len(self.head)]
        if len(self.start) < SNIFF_BYTES:
            lead = chunk if self.start else chunk.lstrip(LEADING)
            self.start += lead[:SNIFF_BYTES - len(self.start)]
        if self.magic is None and len(self.head) >= SNIFF_BYTES:
            self._magic()
        if self.magic == '' and not self.checked and \
                len(self.start) >= SNIFF_BYTES:
            self._markup()
        if self.is_text and not self.magic:
            try:
                self.text.decode(chunk)
            except UnicodeDecodeError:
                self.is_text = False
            if b'\x00' in chunk:
                self.is_text = False

    def _magic(self):
        head = bytes(self.head)
        if head.startswith(MACH_O):
            raise UnsupportedType('executables are not allowed (Mach-O)')
        kind = filetype.guess(head)
        if kind is None:
            self.magic = ''
            return
        mime = SAME_AS.get(kind.mime, kind.mime)
        if mime in RUNNABLE_TYPES:
            raise UnsupportedType(f'executables are not allowed ({mime})')
        self.magic = mime if mime in self.allowed else OCTET_STREAM

    def _markup(self):
        self.checked = True
        refuse_markup(bytes(self.start), bytes(self.head))

    def result(self) -> str:
        """The type, once every byte was fed. Raises UnsupportedType."""
        if self.magic is None:
            self._magic()
        if self.magic:
            return self.magic
        if not self.checked:
            self._markup()
        if self.is_text:
            try:
                self.text.decode(b'', True)
            except UnicodeDecodeError:
                self.is_text = False
        if self.is_text and 'text/plain' in self.allowed:
            return 'text/plain'
        return OCTET_STREAM
