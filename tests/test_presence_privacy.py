"""Presence does not enumerate accounts: a user learns online and last
seen only of people who share a room with them and do not block them,
whether they ask (the ``presence`` event) or are told (``presence``
events); on one process and on two sharing Redis."""
import pytest

from tests.kit import (FAST_REDIS_ENV, ServerProcess, connect, register,
                       running_servers, unique_name)

# Offline half a second after the last socket closes, so a test sees it.
FAST = {'POSTBOX_PRESENCE_GRACE_SECONDS': '0.5'}


@pytest.fixture(params=['local', 'redis'])
def urls(request, tmp_path):
    """The URLs of one process, or of two sharing a Redis; users are
    spread over them in turn."""
    if request.param == 'local':
        server = ServerProcess(tmp_path, env=FAST).start()
        yield [server.url]
        assert server.stop() == 0, server.read_log()
        return
    redis = request.getfixturevalue('redis')
    with running_servers(tmp_path, 2, {
            **FAST_REDIS_ENV, **FAST, 'POSTBOX_REDIS_URL': redis.url,
            'POSTBOX_REDIS_CHANNEL': 'pb-' + tmp_path.name}) as servers:
        yield [server.url for server in servers]


async def people(urls, count):
    """``count`` registered and connected users, on the URLs in turn:
    [(user, client)]."""
    result = []
    for i in range(count):
        url = urls[i % len(urls)]
        user, token = await register(url)
        result.append((user, await connect(url, token)))
    return result


def about(user):
    return lambda event: event['user']['id'] == user['id']


async def test_presence_only_of_room_mates_who_do_not_block(urls):
    (alice, a), (bob, b), (carol, c), (stranger, s) = await people(urls, 4)
    ack = await a.call('create_group', {
        'name': 'team', 'members': [bob['username'], carol['username']]})
    assert ack['ok'], ack
    assert (await c.call('block', {'username': alice['username']}))['ok']
    unknown = unique_name('nobody')
    ack = await a.call('presence', {'usernames': [
        bob['username'], carol['username'], stranger['username'], unknown,
        alice['username']]})
    assert ack['ok'], ack
    # The room mate and herself; the blocker, the stranger (online, in no
    # room with her) and the unknown name all look the same: absent.
    assert set(ack['presence']) == {bob['username'], alice['username']}
    assert ack['presence'][bob['username']]['online'] is True
    # The stranger cannot see alice either; bob can.
    ack = await s.call('presence', {'usernames': [alice['username']]})
    assert ack == {'ok': True, 'presence': {}}
    ack = await b.call('presence', {'usernames': [alice['username']]})
    assert ack['presence'][alice['username']]['online'] is True
    for client in (a, b, c, s):
        await client.close()


async def test_a_blocker_coming_and_going_is_not_announced_to_the_blocked(
        urls):
    (alice, a), (bob, b), (carol, c) = await people(urls, 3)
    ack = await a.call('create_group', {
        'name': 'team', 'members': [bob['username'], carol['username']]})
    assert ack['ok'], ack
    assert (await c.call('block', {'username': alice['username']}))['ok']
    # Alice saw carol online: the block hides that at once, the last seen
    # time included.
    hidden = await a.next('presence', 10, where=about(carol))
    assert (hidden['online'], hidden['last_seen']) == (False, None)
    await b.nothing('presence', 0.3, where=about(carol))
    await c.close()
    offline = await b.next('presence', 10, where=about(carol))
    assert offline['online'] is False
    c = await connect(urls[-1], c.token)
    online = await b.next('presence', 10, where=about(carol))
    assert online['online'] is True
    # Bob was told both times; alice, whom carol blocks, neither time.
    await a.nothing('presence', 1.0, where=about(carol))
    # Carol still hears about alice: she blocked, she was not blocked.
    await a.close()
    gone = await c.next('presence', 10, where=about(alice))
    assert gone['online'] is False
    await b.close()
    await c.close()


async def test_unblocking_shows_presence_again_to_room_mates_only(urls):
    (alice, a), (bob, b), (stranger, s) = await people(urls, 3)
    assert (await a.call('open_dm', {'username': bob['username']}))['ok']
    for blocked in (bob, stranger):
        assert (await a.call('block', {'username': blocked['username']}))[
            'ok']
    assert (await b.next('presence', 10, where=about(alice)))[
        'online'] is False
    for blocked in (bob, stranger):
        assert (await a.call('unblock', {'username': blocked['username']}))[
            'ok']
    shown = await b.next('presence', 10, where=about(alice))
    assert shown['online'] is True and shown['last_seen']
    # The stranger shares no room with alice: told nothing either time, so
    # a block does not tell them that alice exists.
    await s.nothing('presence', 0.5, where=about(alice))
    # Blocking twice hides nothing more: no second event.
    assert (await a.call('block', {'username': bob['username']}))['ok']
    await b.next('presence', 10, where=about(alice))
    assert (await a.call('block', {'username': bob['username']}))['ok']
    await b.nothing('presence', 0.5, where=about(alice))
    for client in (a, b, s):
        await client.close()


async def test_presence_asks_about_at_most_100_usernames(urls):
    [(alice, a)] = await people(urls, 1)
    names = [unique_name() for _ in range(100)]
    ack = await a.call('presence', {'usernames': names})
    assert ack == {'ok': True, 'presence': {}}
    ack = await a.call('presence', {'usernames': names + ['one_more']})
    assert ack['ok'] is False and ack['error']['code'] == 'too_large', ack
    await a.close()
