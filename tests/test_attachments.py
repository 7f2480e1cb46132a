"""Attachments over real HTTP and Socket.IO: upload, send, receive and
download; who may read; refused types and sizes; thumbnails; ranges;
removal with the message and of unsent uploads; a 50 MB upload with flat
server memory."""
import asyncio
import hashlib
import io
import os
import stat
import struct
import uuid
import zlib

import aiohttp
from PIL import Image

from tests.helpers import (ServerProcess, http, pair, register,
                           upload)

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
    refused = [
        (b'\x7fELF\x02\x01\x01\x00' + bytes(2000), 'cat.png'),
        (b'MZ\x90\x00\x03\x00\x00\x00' + bytes(2000), 'setup.txt'),
        (b'<!DOCTYPE html><html><script>alert(1)</script></html>',
         'note.txt'),
        (b'\n  <html><body onload="alert(1)"></body></html>', 'page.jpg'),
        (b'<svg xmlns="http://www.w3.org/2000/svg" onload="alert(1)"/>',
         'logo.png'),
        (b'<?xml version="1.0"?><svg/>', 'logo.svg'),
        (b'#!/bin/sh\nrm -rf ~\n', 'run.txt'),
        (b'hello \xff\xfe not utf-8', 'bin.txt'),
        (bytes(range(256)) * 8, 'random.bin'),
    ]
    for data, name in refused:
        status, body = await upload(base, token, data, name)
        assert status == 415, (name, body)
        assert body['error']['code'] == 'invalid'
    status, body = await upload(base, token, b'', 'empty.txt')
    assert status == 400 and body['error']['code'] == 'invalid'
    # A broken image (right magic, garbage after it) is refused too, and
    # so is a decompression bomb (it would be shown inline).
    for data, message in (
            (png(10, 10)[:40] + bytes(200), 'the image could not be read'),
            (png_claiming(10 ** 5, 10 ** 5), 'the image has too many pixels')):
        status, body = await upload(base, token, data, 'image.png')
        assert status == 415 and body['error'] == {
            'code': 'invalid', 'message': message}
    assert set(stored_files(server)) == before


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


def rss_kib(pid) -> int:
    with open(f'/proc/{pid}/status') as f:
        for line in f:
            if line.startswith('VmRSS:'):
                return int(line.split()[1])
    raise AssertionError('no VmRSS')


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
