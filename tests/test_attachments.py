"""Attachments over real HTTP and Socket.IO: upload, send, receive and
download; who may read; refused types and sizes; thumbnails; ranges;
removal with the message and of unsent uploads; a 50 MB upload with flat
server memory."""
import asyncio
import hashlib
import io
import json
import os
import stat
import struct
import subprocess
import uuid
import zlib

import aiohttp
import pytest
from PIL import Image

from tests.kit import ServerProcess, http, pair, register, rss_kib, upload

MIB = 1024 * 1024


async def fetch(base, path, token, headers=None):
    """GET ``path``; returns (status, response headers, body bytes)."""
    headers = dict(headers or {})
    if token:
        headers['Authorization'] = f'Bearer {token}'
    async with aiohttp.ClientSession() as session:
        async with session.get(base + path, headers=headers) as resp:
            return resp.status, resp.headers, await resp.read()


def stored_files(server) -> list:
    root = server.data_dir / 'attachments'
    return [p for p in root.rglob('*') if p.is_file()] if root.exists() \
        else []


def stored_with(server, data) -> list:
    return [p for p in stored_files(server) if p.read_bytes() == data]


def png_claiming(width, height) -> bytes:
    """A PNG header claiming a huge canvas: a decompression bomb's
    signature, without the bomb."""
    def chunk(kind, data):
        return (struct.pack('>I', len(data)) + kind + data +
                struct.pack('>I', zlib.crc32(kind + data)))
    return (b'\x89PNG\r\n\x1a\n' +
            chunk(b'IHDR', struct.pack('>IIBBBBB', width, height, 8, 2, 0,
                                       0, 0)) +
            chunk(b'IDAT', zlib.compress(b'')) + chunk(b'IEND', b''))


def png(width, height) -> bytes:
    out = io.BytesIO()
    Image.new('RGB', (width, height), (200, 30, 90)).save(out, 'PNG')
    return out.getvalue()


async def dm_pair(base):
    """``pair`` shaped as (user, token, client) per person, plus the room."""
    alice, bob, a, b, room = await pair(base)
    return (alice, a.token, a), (bob, b.token, b), room


async def send(client, room, attachment_ids, body=''):
    ack = await client.call('send_dm', {
        'room_id': room['id'], 'body': body,
        'client_msg_id': uuid.uuid4().hex, 'attachments': attachment_ids})
    assert ack['ok'], ack
    return ack['message']


async def test_image_upload_send_receive_download(server):
    base = server.url
    (alice, ta, a), (bob, tb, b), room = await dm_pair(base)
    data = png(800, 600)
    status, body = await upload(base, ta, data, 'holiday.png', 'image/png')
    assert status == 201, body
    att = body['attachment']
    assert att['filename'] == 'holiday.png'
    assert att['content_type'] == 'image/png' and att['size'] == len(data)
    assert (att['width'], att['height']) == (800, 600)
    assert att['url'] == f'/api/attachments/{att["id"]}'

    # Not sent yet: the recipient cannot read it.
    status, _, _ = await fetch(base, att['url'], tb)
    assert status == 404

    sent = await send(a, room, [att['id']], 'look')
    assert sent['attachments'] == [att]
    got = await b.next('message', where=lambda m: m['id'] == sent['id'])
    assert got['attachments'] == [att]

    status, headers, content = await fetch(base, att['url'], tb)
    assert status == 200 and content == data
    assert headers['Content-Type'] == 'image/png'
    assert headers['Content-Disposition'].startswith('inline;')
    assert headers['X-Content-Type-Options'] == 'nosniff'
    assert 'sandbox' in headers['Content-Security-Policy']

    status, headers, thumb = await fetch(base, att['thumbnail_url'], tb)
    assert status == 200 and headers['Content-Type'] == 'image/webp'
    with Image.open(io.BytesIO(thumb)) as image:
        assert max(image.size) <= 320 and image.size[0] > image.size[1]

    # History shows it too, over HTTP.
    status, page = await http(base, 'GET',
                              f'/api/rooms/{room["id"]}/messages', token=tb)
    assert status == 200
    assert [m['attachments'] for m in page['messages']
            if m['id'] == sent['id']] == [[att]]
    await a.close()
    await b.close()


async def test_one_upload_sent_twice_at_once_goes_with_one_message(loaded):
    """Two sends naming the same upload, to two rooms, queued together
    (among other sends, so they share a write batch): one is accepted and
    keeps the file, the other is refused; nobody is acked a file they
    cannot then fetch."""
    (_, ta, a), (bob, _, _), room = await dm_pair(loaded.url)
    carol, tc = await register(loaded.url)
    other = (await a.call('open_dm', {'username': carol['username']}))['room']
    for n in range(5):
        _, up = await upload(loaded.url, ta, b'only once %d' % n, 'once.txt')
        attachment_id = up['attachment']['id']
        noise = [a.call('send_dm', {'room_id': room['id'], 'body': 'x',
                                    'client_msg_id': uuid.uuid4().hex})
                 for _ in range(20)]
        *_, first, second = await asyncio.gather(*noise, *(
            a.call('send_dm', {'room_id': r['id'], 'body': 'file',
                               'client_msg_id': uuid.uuid4().hex,
                               'attachments': [attachment_id]})
            for r in (room, other)))
        assert sorted([first['ok'], second['ok']]) == [False, True], \
            (n, first, second)
        refused = second if first['ok'] else first
        assert refused['error']['code'] == 'invalid'
        kept = first if first['ok'] else second
        kept_room = room if first['ok'] else other
        assert [f['id'] for f in kept['message']['attachments']] == \
            [attachment_id]
        history = await a.call('history', {'room_id': kept_room['id']})
        reloaded = [m for m in history['messages']
                    if m['id'] == kept['message']['id']]
        assert [f['id'] for f in reloaded[0]['attachments']] == \
            [attachment_id]
        reader = tc if kept_room is other else None
        if reader:
            status, _, body = await fetch(
                loaded.url, f'/api/attachments/{attachment_id}', reader)
            assert (status, body) == (200, b'only once %d' % n)


async def test_outsider_and_missing_get_404(server):
    base = server.url
    (alice, ta, a), (bob, tb, b), room = await dm_pair(base)
    _, to = await register(base)
    status, body = await upload(base, ta, png(40, 30), 'p.png')
    att = body['attachment']
    await send(a, room, [att['id']])
    for path in (att['url'], att['thumbnail_url']):
        status, _, content = await fetch(base, path, to)
        assert status == 404 and b'not_found' in content
        status, _, _ = await fetch(base, path, None)
        assert status == 401
    status, _, _ = await fetch(base, '/api/attachments/99999999', ta)
    assert status == 404
    status, _, _ = await fetch(base, '/api/attachments/nope', ta)
    assert status == 404

    # Someone else's upload, or one already sent, cannot be attached.
    status, body = await upload(base, to, b'hello', 'h.txt')
    theirs = body['attachment']['id']
    for ids in ([theirs], [att['id']]):
        ack = await a.call('send_dm', {
            'room_id': room['id'], 'body': 'x',
            'client_msg_id': uuid.uuid4().hex, 'attachments': ids})
        assert ack == {'ok': False, 'error': {
            'code': 'invalid', 'message': ack['error']['message']}}
    await a.close()
    await b.close()


async def test_text_file_is_a_download_and_path_names_are_harmless(server):
    base = server.url
    (alice, ta, a), (bob, tb, b), room = await dm_pair(base)
    data = f'notes {uuid.uuid4()}\nünïcode ✓\n'.encode()
    status, body = await upload(base, ta, data, '../../x.txt',
                                'text/html')  # the client's type is ignored
    assert status == 201, body
    att = body['attachment']
    assert att['filename'] == 'x.txt'
    assert att['content_type'] == 'text/plain'
    assert 'width' not in att and 'thumbnail_url' not in att
    # Sent over HTTP this time (the bots' way); delivered live.
    status, body = await http(
        base, 'POST', f'/api/rooms/{room["id"]}/messages', token=ta,
        json={'body': '', 'client_msg_id': uuid.uuid4().hex,
              'attachments': [att['id']]})
    assert status == 201 and body['message']['attachments'] == [att]
    got = await b.next('message',
                       where=lambda m: m['id'] == body['message']['id'])
    assert got['attachments'] == [att]
    status, headers, content = await fetch(base, att['url'], tb)
    assert status == 200 and content == data
    assert headers['Content-Type'] == 'text/plain; charset=utf-8'
    assert headers['Content-Disposition'] == (
        'attachment; filename="x.txt"; filename*=UTF-8\'\'x.txt')
    # Stored under a random name inside the attachments dir, nowhere else.
    [path] = stored_with(server, data)
    assert path.name != 'x.txt' and len(path.name) == 32
    assert not (server.data_dir.parent / 'x.txt').exists()
    assert not (server.data_dir / 'x.txt').exists()

    status, body = await upload(base, ta, b'ok', 'r\u00e9sum\u00e9 "1";.txt')
    assert status == 201
    assert body['attachment']['filename'] == 'r\u00e9sum\u00e9 "1";.txt'
    # aiohttp's client percent-encodes the whole name: same result.
    form = aiohttp.FormData()
    form.add_field('file', b'ok', filename='..\\..\\r\u00e9sum\u00e9.txt')
    status, other = await http(base, 'POST', '/api/attachments', token=ta,
                               data=form)
    assert status == 201
    assert other['attachment']['filename'] == 'r\u00e9sum\u00e9.txt'
    status, headers, _ = await fetch(base, body['attachment']['url'], ta)
    assert headers['Content-Disposition'] == (
        'attachment; filename="r_sum_ _1__.txt"; '
        "filename*=UTF-8''r%C3%A9sum%C3%A9%20%221%22%3B.txt")
    await a.close()
    await b.close()


async def test_active_and_executable_content_refused(server):
    base = server.url
    _, token = await register(base)
    before = set(stored_files(server))
    html = 'HTML, SVG and XML documents are not allowed'
    refused = [
        (b'\x7fELF\x02\x01\x01\x00' + bytes(2000), 'cat.png',
         'executables are not allowed (application/x-executable)'),
        (b'MZ\x90\x00\x03\x00\x00\x00' + bytes(2000), 'setup.txt',
         'executables are not allowed (application/x-msdownload)'),
        (b'\xcf\xfa\xed\xfe\x07\x00\x00\x01' + bytes(2000), 'tool',
         'executables are not allowed (Mach-O)'),
        (b'<!DOCTYPE html><html><script>alert(1)</script></html>',
         'note.txt', html),
        (b'\n  <html><body onload="alert(1)"></body></html>', 'page.jpg',
         html),
        (b'<svg xmlns="http://www.w3.org/2000/svg" onload="alert(1)"/>',
         'logo.png', html),
        (b'<?xml version="1.0"?><svg/>', 'logo.svg', html),
        (b'#!/bin/sh\nrm -rf ~\n', 'run.txt', 'scripts are not allowed'),
        # Past the first kilobyte that was all that used to be looked at.
        (b' \n' * 3000 + b'<html><script>alert(1)</script></html>',
         'late.txt', html),
        (b'\xef\xbb\xbf' + b'\t' * 5000 + b'<svg onload="alert(1)"/>',
         'late.svg', html),
    ]
    for data, name, message in refused:
        status, body = await upload(base, token, data, name)
        assert status == 415, (name, body)
        assert body['error'] == {'code': 'invalid', 'message': message}, name
    status, body = await upload(base, token, b'', 'empty.txt')
    assert status == 400 and body['error']['code'] == 'invalid'
    # A broken image (right magic, garbage after it) is refused: it would
    # be shown inline.
    status, body = await upload(base, token, png(10, 10)[:40] + bytes(200),
                                'image.png')
    assert status == 415 and body['error'] == {
        'code': 'invalid', 'message': 'the image could not be read'}
    assert set(stored_files(server)) == before


async def test_unknown_files_are_kept_as_downloads(server):
    """Item 5: any file a browser would not run is accepted; bytes with no
    known type are application/octet-stream, served as a download."""
    base = server.url
    (_, ta, a), (_, tb, b), room = await dm_pair(base)
    files = [
        (bytes(range(256)) * 8, 'random.bin'),             # NUL bytes
        (b'\x00\x01 some record \x00' + os.urandom(3000), 'db.dat'),
        (b'caf\xe9 cr\xe8me, latin-1 text\n' * 100, 'menu.txt'),  # not UTF-8
        (b'BM' + bytes(4000), 'picture.bmp'),  # a type not on the list
    ]
    for data, name in files:
        status, body = await upload(base, ta, data, name)
        assert status == 201, (name, body)
        att = body['attachment']
        assert att['content_type'] == 'application/octet-stream', name
        assert att['filename'] == name and att['size'] == len(data)
        await send(a, room, [att['id']])
        status, headers, content = await fetch(base, att['url'], tb)
        assert status == 200 and content == data
        assert headers['Content-Type'] == 'application/octet-stream'
        assert headers['Content-Disposition'].startswith('attachment;')
        assert headers['X-Content-Type-Options'] == 'nosniff'
    await a.close()
    await b.close()


async def test_runnable_names_are_never_kept(server):
    """Item 14: a file named like a page or a program is stored (and
    downloaded) under a name that opens as what it really is."""
    base = server.url
    _, token = await register(base)
    pdf = b'%PDF-1.4\n' + bytes(500)
    # Markup that does not start the file is text: served as text/plain,
    # as a download, never sniffed, and not named .html.
    text = b'Meeting notes\n' * 200 + b'<html><script>x()</script></html>\n'
    for data, name, stored, mime in (
            (b'just text\n', 'invoice.html', 'invoice.html.txt',
             'text/plain'),
            (pdf, 'invoice.html', 'invoice.html.pdf', 'application/pdf'),
            (text, 'page.HTM', 'page.HTM.txt', 'text/plain'),
            (b'\x00\x01', 'tool.exe', 'tool.exe.bin',
             'application/octet-stream'),
            # Windows drops trailing dots and spaces when saving.
            (b'hello\n', 'a.svg. . ', 'a.svg.txt', 'text/plain'),
            # ... also where the cut to 255 characters leaves them.
            (b'hello\n', 'A' * 249 + '.html.' + 'B' * 50,
             'A' * 249 + '.h.txt', 'text/plain'),
            (b'hello\n', 'help.chm', 'help.chm.txt', 'text/plain'),
            (b'hello\n', 'console.msc', 'console.msc.txt', 'text/plain'),
            (b'hello\n', 'notes.txt', 'notes.txt', 'text/plain'),
            (b'hello\n', 'README', 'README', 'text/plain')):
        status, body = await upload(base, token, data, name)
        assert status == 201, (name, body)
        att = body['attachment']
        assert (att['filename'], att['content_type']) == (stored, mime)
        status, headers, content = await fetch(base, att['url'], token)
        assert status == 200 and content == data
        assert headers['Content-Disposition'] == (
            f"attachment; filename=\"{stored}\"; "
            f"filename*=UTF-8''{stored.replace(' ', '%20')}")
        assert headers['X-Content-Type-Options'] == 'nosniff'


async def test_range_request(server):
    base = server.url
    _, token = await register(base)
    data = os.urandom(300_000)
    # A zip: random bytes behind a zip signature sniff as application/zip.
    data = b'PK\x03\x04' + data
    status, body = await upload(base, token, data, 'archive.zip')
    assert status == 201 and body['attachment']['content_type'] == \
        'application/zip'
    url = body['attachment']['url']
    status, headers, content = await fetch(
        base, url, token, {'Range': 'bytes=1000-1999'})
    assert status == 206 and content == data[1000:2000]
    assert headers['Content-Range'] == f'bytes 1000-1999/{len(data)}'
    assert headers['Content-Disposition'].startswith('attachment;')
    status, headers, content = await fetch(
        base, url, token, {'Range': f'bytes={len(data) - 10}-'})
    assert status == 206 and content == data[-10:]
    # Past the end, or not a range at all: refused as JSON, with the size.
    size = len(data)
    for bad in (f'bytes={size}-', f'bytes={size + 5}-{size + 9}',
                'bytes=abc', 'bytes=9-3'):
        status, headers, content = await fetch(base, url, token,
                                               {'Range': bad})
        assert status == 416, bad
        assert headers['Content-Range'] == f'bytes */{len(data)}'
        assert json.loads(content)['error']['code'] == 'invalid', bad
    # A suffix longer than the file is the whole file.
    status, headers, content = await fetch(
        base, url, token, {'Range': f'bytes=-{len(data) + 100}'})
    assert status == 206 and content == data


async def test_deleting_a_message_removes_its_files(server):
    base = server.url
    (alice, ta, a), (bob, tb, b), room = await dm_pair(base)
    image = png(64, 48)
    text = f'secret {uuid.uuid4()}'.encode()
    ids = []
    for data, name in ((image, 'a.png'), (text, 'b.txt')):
        status, body = await upload(base, ta, data, name)
        assert status == 201
        ids.append(body['attachment'])
    files_before = len(stored_files(server))
    sent = await send(a, room, [att['id'] for att in ids], 'two files')
    assert len(stored_with(server, text)) == 1
    ack = await a.call('delete_message', {'message_id': sent['id']})
    assert ack['ok'] and ack['message']['attachments'] == []
    got = await b.next('message_updated',
                       where=lambda m: m['id'] == sent['id'])
    assert got['deleted'] and got['attachments'] == []
    assert stored_with(server, text) == []
    # The image, its thumbnail and the text file are gone.
    assert len(stored_files(server)) <= files_before - 3
    for att in ids:
        for token in (ta, tb):
            status, _, _ = await fetch(base, att['url'], token)
            assert status == 404
    await a.close()
    await b.close()


async def _generated(total, piece=64 * 1024):
    """An async generator of ``total`` bytes of text, never all at once."""
    line = b'the quick brown fox jumps over the lazy dog 0123456789\n'
    block = (line * (piece // len(line) + 1))[:piece]
    sent = 0
    while sent < total:
        chunk = block[:min(piece, total - sent)]
        sent += len(chunk)
        yield chunk


def _streamed_form(chunks, filename):
    writer = aiohttp.MultipartWriter('form-data')
    part = writer.append(chunks, {'Content-Type': 'text/plain'})
    part.set_content_disposition('form-data', name='file', filename=filename)
    return writer


async def _post_stream(base, token, total, filename='big.txt'):
    async with aiohttp.ClientSession() as session:
        async with session.post(
                base + '/api/attachments',
                data=_streamed_form(_generated(total), filename),
                headers={'Authorization': f'Bearer {token}'}) as resp:
            return resp.status, await resp.json()


async def wait_until(predicate, timeout=10, what='condition'):
    """Poll ``predicate`` (no event to wait on: it looks at the disk)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, what
        await asyncio.sleep(0.05)


async def _abandon_upload(server, token, size):
    """Start a chunked upload over a raw socket, send ``size`` bytes of the
    file, wait until the server is writing it, then hang up."""
    reader, writer = await asyncio.open_connection('127.0.0.1', server.port)
    part = (b'--xyz\r\nContent-Disposition: form-data; name="file"; '
            b'filename="a.txt"\r\nContent-Type: text/plain\r\n\r\n' +
            b'a' * size)
    writer.write(
        b'POST /api/attachments HTTP/1.1\r\nHost: localhost\r\n'
        b'Authorization: Bearer ' + token.encode() + b'\r\n'
        b'Content-Type: multipart/form-data; boundary=xyz\r\n'
        b'Transfer-Encoding: chunked\r\n\r\n' +
        b'%x\r\n' % len(part) + part + b'\r\n')
    await writer.drain()
    await wait_until(lambda: any(p.name.endswith('.part')
                                 for p in stored_files(server)),
                     what='the server never started writing the upload')
    writer.close()


async def test_oversize_and_abandoned_uploads_leave_nothing(tmp_path):
    server = ServerProcess(tmp_path, env={
        'POSTBOX_ATTACHMENT_MAX_BYTES': str(MIB),
        'POSTBOX_ATTACHMENT_UNSENT_MAX': '2'}).start()
    try:
        _, token = await register(server.url)
        # Streamed (chunked, no length): refused while it streams.
        status, body = await _post_stream(server.url, token, 4 * MIB)
        assert status == 413 and body['error']['code'] == 'too_large'
        # A declared length over the limit: refused before reading.
        status, body = await upload(server.url, token, b'x' * (2 * MIB),
                                    'big.txt')
        assert status == 413 and body['error']['code'] == 'too_large'
        assert stored_files(server) == []
        # A client that hangs up mid-way leaves nothing either.
        await _abandon_upload(server, token, MIB // 2)
        await wait_until(lambda: stored_files(server) == [],
                         what='the partial upload was left on disk')
        # Just under the limit is fine.
        status, body = await _post_stream(server.url, token, MIB)
        assert status == 201 and body['attachment']['size'] == MIB
        assert len(stored_files(server)) == 1
        # At most two unsent uploads per user here.
        status, body = await upload(server.url, token, b'two', 'b.txt')
        assert status == 201
        status, body = await upload(server.url, token, b'three', 'c.txt')
        assert status == 429 and body['error']['code'] == 'rate_limited'
        assert len(stored_files(server)) == 2
    finally:
        assert server.stop() == 0, server.read_log()


async def test_unsent_uploads_are_cleaned_up(tmp_path):
    server = ServerProcess(tmp_path, env={
        'POSTBOX_ATTACHMENT_ORPHAN_SECONDS': '1',
        'POSTBOX_ATTACHMENT_CLEANUP_INTERVAL_SECONDS': '0.2'}).start()
    try:
        base = server.url
        (alice, ta, a), (bob, tb, b), room = await dm_pair(base)
        kept_data, lost_data = b'kept ' + os.urandom(8).hex().encode(), \
            b'lost ' + os.urandom(8).hex().encode()
        status, body = await upload(base, ta, kept_data, 'kept.txt')
        kept = body['attachment']
        await send(a, room, [kept['id']])
        status, body = await upload(base, ta, lost_data, 'lost.txt')
        lost = body['attachment']
        assert stored_with(server, lost_data)
        # Wait (bounded) for the periodic cleanup to take the unsent one.
        deadline = asyncio.get_running_loop().time() + 20
        while (await fetch(base, lost['url'], ta))[0] != 404:
            assert asyncio.get_running_loop().time() < deadline, \
                'unsent upload was never cleaned up'
            await asyncio.sleep(0.2)
        assert stored_with(server, lost_data) == []
        status, _, content = await fetch(base, kept['url'], tb)
        assert status == 200 and content == kept_data
        ack = await a.call('send_dm', {
            'room_id': room['id'], 'body': 'late',
            'client_msg_id': uuid.uuid4().hex, 'attachments': [lost['id']]})
        assert not ack['ok'] and ack['error']['code'] == 'invalid'
        await a.close()
        await b.close()
    finally:
        assert server.stop() == 0, server.read_log()


async def test_50mb_upload_with_flat_memory(tmp_path):
    total = 50 * MIB
    server = ServerProcess(tmp_path, env={
        'POSTBOX_ATTACHMENT_MAX_BYTES': str(64 * MIB)}).start()
    try:
        base = server.url
        _, token = await register(base)
        # Warm up: the first upload's code paths and buffers.
        status, _ = await _post_stream(base, token, 2 * MIB, 'warm.txt')
        assert status == 201
        before = rss_kib(server.proc.pid)
        status, body = await _post_stream(base, token, total)
        after = rss_kib(server.proc.pid)
        assert status == 201, body
        att = body['attachment']
        assert att['size'] == total and att['content_type'] == 'text/plain'
        grown_mib = (after - before) / 1024
        print(f'server RSS {before // 1024} MiB -> {after // 1024} MiB '
              f'for a {total // MIB} MiB upload')
        assert grown_mib < 15, f'RSS grew {grown_mib:.1f} MiB'

        # The stored bytes are the sent ones, downloaded as a stream.
        expected = hashlib.sha256()
        async for chunk in _generated(total):
            expected.update(chunk)
        got = hashlib.sha256()
        async with aiohttp.ClientSession() as session:
            async with session.get(
                    base + att['url'],
                    headers={'Authorization': f'Bearer {token}'}) as resp:
                assert resp.status == 200
                assert resp.headers['Content-Disposition'].startswith(
                    'attachment;')
                async for chunk in resp.content.iter_chunked(MIB):
                    got.update(chunk)
        assert got.hexdigest() == expected.hexdigest()
        status, _, tail = await fetch(base, att['url'], token,
                                      {'Range': f'bytes={total - 100}-'})
        assert status == 206 and len(tail) == 100
    finally:
        assert server.stop() == 0, server.read_log()


def bomb_png(width, height) -> bytes:
    """A real RGBA PNG of ``width`` x ``height`` black pixels: a few
    hundred KB that decode to 4 bytes a pixel. Compressed row by row, so
    the test never holds the decoded size either."""
    def chunk(kind, data):
        return (struct.pack('>I', len(data)) + kind + data +
                struct.pack('>I', zlib.crc32(kind + data)))
    compressor = zlib.compressobj(9)
    row = bytes(1 + 4 * width)  # filter byte 0, then the pixels
    idat = b''.join(compressor.compress(row) for _ in range(height))
    idat += compressor.flush()
    return (b'\x89PNG\r\n\x1a\n' +
            chunk(b'IHDR', struct.pack('>IIBBBBB', width, height, 8, 6, 0,
                                       0, 0)) +
            chunk(b'IDAT', idat) + chunk(b'IEND', b''))


async def test_image_bomb_is_a_download_and_memory_stays_bounded(tmp_path):
    """Item 10: a PNG of a few hundred KB that decodes to 240 MB is never
    decoded (the server's peak memory grows by less than 60 MB), gets no
    thumbnail and is served as a download, never inline; a canvas past
    Pillow's own limit likewise."""
    server = ServerProcess(tmp_path).start()
    try:
        base = server.url
        (_, ta, a), (_, tb, b), room = await dm_pair(base)
        # Warm up the image path (thread, codecs) with a normal picture.
        status, body = await upload(base, ta, png(400, 300), 'warm.png')
        assert status == 201 and 'thumbnail_url' in body['attachment']
        bomb = bomb_png(7750, 7750)  # 60 MP, over the 40 MP default
        assert len(bomb) < 400_000
        before = rss_kib(server.pid, peak=True)
        status, body = await upload(base, ta, bomb, 'bomb.png')
        grown_mib = (rss_kib(server.pid, peak=True) - before) / 1024
        assert status == 201, body
        assert grown_mib < 60, f'peak RSS grew {grown_mib:.0f} MiB'
        att = body['attachment']
        assert att['content_type'] == 'image/png'
        assert (att['width'], att['height']) == (7750, 7750)
        assert 'thumbnail_url' not in att
        status, body = await upload(base, ta, png_claiming(10 ** 5, 10 ** 5),
                                    'claim.png')
        assert status == 201, body
        claim = body['attachment']
        assert 'thumbnail_url' not in claim
        await send(a, room, [att['id'], claim['id']])
        for item in (att, claim):
            status, headers, _ = await fetch(base, item['url'], tb)
            assert status == 200
            assert headers['Content-Disposition'].startswith('attachment;')
            status, _, _ = await fetch(base, item['url'] + '/thumbnail', tb)
            assert status == 404
        await a.close()
        await b.close()
    finally:
        assert server.stop() == 0, server.read_log()


async def test_concurrent_uploads_cannot_pass_the_cap(tmp_path,
                                                      database_env):
    """Item 12: uploads sent all at once do not all pass the unsent cap."""
    server = ServerProcess(tmp_path, env={
        **database_env(),
        'POSTBOX_ATTACHMENT_UNSENT_MAX': '5'}).start()
    try:
        _, token = await register(server.url)
        results = await asyncio.gather(*(
            upload(server.url, token, b'file %d\n' % n * 2000, f'{n}.txt')
            for n in range(30)))
        statuses = sorted(status for status, _ in results)
        assert statuses == [201] * 5 + [429] * 25, statuses
        assert all(body['error']['code'] == 'rate_limited'
                   for status, body in results if status == 429)
        assert len(stored_files(server)) == 5
    finally:
        assert server.stop() == 0, server.read_log()


async def test_uploads_on_two_processes_cannot_pass_the_cap(
        tmp_path, database_env):
    """Item 12: the cap holds across processes sharing one database: the
    count and the insert are one transaction, not just one process's
    bookkeeping."""
    env = {**database_env(), 'POSTBOX_ATTACHMENT_UNSENT_MAX': '4'}
    first = ServerProcess(tmp_path, env=env).start()
    second = None
    try:
        second = ServerProcess(tmp_path, env=env).start()
        _, token = await register(first.url)
        for attempt in range(3):
            results = await asyncio.gather(*(
                upload(proc.url, token, b'%d\n' % n * 100, f'{n}.txt')
                for n in range(12) for proc in (first, second)))
            statuses = sorted(status for status, _ in results)
            assert statuses == [201] * 4 + [429] * 20 if attempt == 0 \
                else [429] * 24, (attempt, statuses)
        assert len(stored_files(first)) == 4
    finally:
        assert first.stop() == 0, first.read_log()
        if second is not None:
            assert second.stop() == 0, second.read_log()


async def test_sending_to_a_room_of_ones_own_does_not_free_the_cap(
        tmp_path, database_env):
    """Item 12: uploads sent to a group with no other member still count
    as unsent (nobody else can read them); once someone else can, they do
    not."""
    server = ServerProcess(tmp_path, env={
        **database_env(),
        'POSTBOX_ATTACHMENT_UNSENT_MAX': '2'}).start()
    try:
        base = server.url
        (_, ta, a), (bob, _, _), _ = await dm_pair(base)
        ack = await a.call('create_group', {'name': 'me', 'members': []})
        assert ack['ok'], ack
        group = ack['room']
        ids = []
        for n in range(2):
            status, body = await upload(base, ta, b'x%d' % n, 'x.txt')
            assert status == 201
            ids.append(body['attachment']['id'])
        status, body = await upload(base, ta, b'third', 'x.txt')
        assert status == 429
        await send(a, group, ids)
        status, body = await upload(base, ta, b'third', 'x.txt')
        assert status == 429 and body['error']['code'] == 'rate_limited'
        ack = await a.call('add_members', {'room_id': group['id'],
                                           'members': [bob['username']]})
        assert ack['ok'], ack
        status, body = await upload(base, ta, b'third', 'x.txt')
        assert status == 201, body
        await a.close()
    finally:
        assert server.stop() == 0, server.read_log()


async def test_unsent_uploads_have_a_byte_quota(tmp_path, database_env):
    """Item 12: a user's unsent uploads hold at most
    attachment_unsent_max_bytes; past it, 413 with a clear message, and
    nothing is left on disk."""
    server = ServerProcess(tmp_path, env={
        **database_env(),
        'POSTBOX_ATTACHMENT_UNSENT_MAX_BYTES': str(MIB)}).start()
    try:
        base = server.url
        (_, ta, a), _, room = await dm_pair(base)
        status, body = await _post_stream(base, ta, 700 * 1024, 'a.txt')
        assert status == 201, body
        first = body['attachment']
        # Streamed (no length): refused when the quota is passed.
        status, body = await _post_stream(base, ta, 700 * 1024, 'b.txt')
        assert status == 413, body
        assert body['error']['code'] == 'too_large'
        assert 'unsent uploads: at most 1048576 bytes' in \
            body['error']['message']
        # With a length: refused before it streams.
        status, body = await upload(base, ta, b'y' * (700 * 1024), 'c.txt')
        assert status == 413 and body['error']['code'] == 'too_large'
        assert len(stored_files(server)) == 1
        # Sending the first frees its bytes.
        await send(a, room, [first['id']])
        status, body = await _post_stream(base, ta, 700 * 1024, 'b.txt')
        assert status == 201, body
        await a.close()
    finally:
        assert server.stop() == 0, server.read_log()


async def test_trickling_upload_is_cut_off_with_408(tmp_path):
    """Item 14: an upload that sends a byte now and then, never pausing
    past the idle limit but far below the minimum rate, gets a JSON 408
    and leaves no file."""
    server = ServerProcess(tmp_path, env={
        'POSTBOX_ATTACHMENT_UPLOAD_IDLE_SECONDS': '1',
        'POSTBOX_ATTACHMENT_UPLOAD_MIN_BYTES_PER_SECOND': '1000'}).start()
    writer = None
    try:
        _, token = await register(server.url)
        reader, writer = await asyncio.open_connection('127.0.0.1',
                                                       server.port)
        part = (b'--xyz\r\nContent-Disposition: form-data; name="file"; '
                b'filename="slow.txt"\r\nContent-Type: text/plain\r\n\r\n'
                b'a')
        writer.write(
            b'POST /api/attachments HTTP/1.1\r\nHost: localhost\r\n'
            b'Authorization: Bearer ' + token.encode() + b'\r\n'
            b'Content-Type: multipart/form-data; boundary=xyz\r\n'
            b'Transfer-Encoding: chunked\r\n\r\n' +
            b'%x\r\n' % len(part) + part + b'\r\n')
        await writer.drain()

        async def trickle():
            while True:
                await asyncio.sleep(0.3)
                writer.write(b'1\r\nb\r\n')
                await writer.drain()

        trickling = asyncio.create_task(trickle())
        try:
            head = await asyncio.wait_for(reader.readuntil(b'\r\n\r\n'), 20)
        finally:
            trickling.cancel()
            await asyncio.gather(trickling, return_exceptions=True)
        assert head.startswith(b'HTTP/1.1 408'), head
        length = int(next(line.split(b':')[1] for line in head.split(b'\r\n')
                          if line.lower().startswith(b'content-length')))
        body = await asyncio.wait_for(reader.readexactly(length), 10)
        error = json.loads(body)['error']
        assert error['code'] == 'invalid' and 'too slowly' in \
            error['message']
        await wait_until(lambda: stored_files(server) == [],
                         what='the stalled upload was left on disk')
    finally:
        if writer is not None:
            writer.close()
        assert server.stop() == 0, server.read_log()


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_data_files_are_private(tmp_path):
    """Item 14: the data dir is 0700 and every file the server writes in
    it (database, WAL, generated secret, attachments, thumbnails) 0600."""
    data = tmp_path / 'fresh'
    server = ServerProcess(tmp_path, env={
        'POSTBOX_DATA_DIR': str(data), 'POSTBOX_SECRET': ''}).start()
    try:
        _, token = await register(server.url)
        status, body = await upload(server.url, token, png(64, 64), 'a.png')
        assert status == 201 and 'thumbnail_url' in body['attachment']
        status, body = await upload(server.url, token, b'text', 'a.txt')
        assert status == 201
        files = [p for p in data.rglob('*') if p.is_file()]
        names = {p.name for p in files}
        assert {'postbox.db', 'postbox.db-wal', 'secret'} <= names, names
        assert len([p for p in files if 'attachments' in p.parts]) == 3
        assert {str(p): oct(mode(p)) for p in files
                if mode(p) != 0o600} == {}
        dirs = [data] + [p for p in data.rglob('*') if p.is_dir()]
        assert {str(p): oct(mode(p)) for p in dirs
                if mode(p) != 0o700} == {}
    finally:
        assert server.stop() == 0, server.read_log()


async def test_full_disk_gets_507(tmp_path):
    """An upload that does not fit on the disk gets a JSON 507 saying so,
    leaves nothing behind, and the next one that fits is stored. The
    attachments dir is a 1 MiB tmpfs (mounting needs root)."""
    if os.geteuid() != 0:
        pytest.skip('mounting a small file system needs root')
    data = tmp_path / 'data'
    disk = data / 'attachments'
    disk.mkdir(parents=True)
    subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=1m', 'tmpfs',
                    str(disk)], check=True)
    server = None
    try:
        server = ServerProcess(data).start()
        _, token = await register(server.url)
        status, body = await _post_stream(server.url, token, 3 * MIB)
        assert status == 507, body
        assert body['error']['code'] == 'unavailable'
        assert 'disk is full' in body['error']['message']
        assert stored_files(server) == []
        status, body = await upload(server.url, token, b'small', 'a.txt')
        assert status == 201, body
    finally:
        if server is not None:
            assert server.stop() == 0, server.read_log()
        subprocess.run(['umount', '-l', str(disk)], check=False)


async def test_a_room_full_of_pictures_loads_within_the_event_limit(
        tmp_path):
    """Opening a conversation fetches every picture's thumbnail at once:
    downloads do not spend the per-user event bucket that every other
    HTTP request and Socket.IO event spends, so a tight bucket still
    shows them all (while a loop of API calls is throttled)."""
    server = ServerProcess(tmp_path, env={'POSTBOX_EVENT_BURST': '8',
                                          'POSTBOX_EVENT_RATE_PER_SECOND':
                                          '0.1'})
    server.start()
    try:
        base = server.url
        (alice, ta, a), (bob, tb, b), room = await dm_pair(base)
        status, body = await upload(base, ta, png(64, 48), 'p.png',
                                    'image/png')
        assert status == 201, body
        att = body['attachment']
        await send(a, room, [att['id']], 'pictures')
        got = await asyncio.gather(*(
            fetch(base, path, tb) for path in
            [att['thumbnail_url'], att['url']] * 15))
        assert [status for status, _, _ in got] == [200] * 30
        statuses = [s for s, _ in await asyncio.gather(*(
            http(base, 'GET', '/api/rooms', token=tb) for _ in range(20)))]
        assert 429 in statuses
        await a.close()
        await b.close()
    finally:
        assert server.stop() == 0, server.read_log()


async def test_many_big_images_of_one_user_do_not_hold_up_anothers(server):
    """Thumbnails are made one at a time per user: a user uploading many
    big images at once waits for their own, and another user's picture,
    uploaded after all of them, is done before most of them."""
    base = server.url
    _, heavy = await register(base)
    _, light = await register(base)
    big = png(4000, 4000)  # small to send, 16 megapixels to decode
    done = []

    async def put(token, data, name):
        status, body = await upload(base, token, data, name)
        assert status == 201, body
        assert body['attachment']['thumbnail_url'], body
        done.append(name)

    heavy_uploads = [asyncio.create_task(put(heavy, big, f'big{n}.png'))
                     for n in range(12)]
    while not done:  # the pool is busy with the first big ones
        await asyncio.sleep(0.01)
    await put(light, png(40, 30), 'small.png')
    await asyncio.gather(*heavy_uploads)
    assert done.index('small.png') < 6, done


async def test_a_caption_can_be_edited_away_but_not_a_texts_only_body(server):
    """As when sending: a message with attachments may have its caption
    edited to nothing; a message of text only may not become blank."""
    base = server.url
    (alice, ta, a), (bob, tb, b), room = await dm_pair(base)
    status, body = await upload(base, ta, png(20, 20), 'p.png')
    assert status == 201, body
    photo = await send(a, room, [body['attachment']['id']], 'a caption')
    ack = await a.call('edit_message', {'message_id': photo['id'],
                                        'body': ''})
    assert ack['ok'], ack
    assert ack['message']['body'] == '' and ack['message']['attachments']
    text = await send(a, room, [], 'just text')
    ack = await a.call('edit_message', {'message_id': text['id'],
                                        'body': '  '})
    assert ack['error']['code'] == 'invalid', ack
    await a.close()
    await b.close()
