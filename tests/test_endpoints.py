"""The health-per-endpoint rules (op/endpoints.py), exactly, with a clock the tests move: no I/O, no TF."""

import pytest

from remote_predict.op import endpoints
from remote_predict.op.endpoints import Endpoint, EndpointSet


def test_stall_after_follows_the_targets_latency_within_bounds():
    assert endpoints.stall_after(None, 10.0) == endpoints.STALL_UNKNOWN_SECONDS  # nothing known yet: first calls
    assert endpoints.stall_after(0.001, 10.0) == endpoints.STALL_FLOOR_SECONDS  # 8 x 1 ms < 50 ms
    assert endpoints.stall_after(0.020, 10.0) == pytest.approx(0.160)  # 8 x the p99
    assert endpoints.stall_after(5.0, 2.0) == pytest.approx(0.5)  # never beyond a quarter of the deadline
    assert endpoints.stall_after(None, 0.1) == pytest.approx(0.025)  # a short deadline shortens the floor


def test_the_last_endpoint_up_is_given_a_quarter_of_the_deadline():
    """With nowhere else to send a call, guessing early gains nothing and a false guess fails every call."""
    assert endpoints.stall_after(0.001, 2.0, alternatives=False) == pytest.approx(0.5)
    assert endpoints.stall_after(None, 2.0, alternatives=False) == pytest.approx(0.5)
    replicas = EndpointSet("tcp://a:1,b:1", ["a:1", "b:1"])
    a, b = replicas.endpoints
    assert replicas.others_up(a) and replicas.others_up(b)
    replicas.eject(a, "stopped answering")
    assert replicas.others_up(a) and not replicas.others_up(b)  # b is the last one up
    single = EndpointSet("tcp://a:1", ["a:1"])
    assert not single.others_up(single.endpoints[0])


def test_a_replica_stopped_answering_only_when_it_answered_nothing_since():
    replica = Endpoint("a:1", last_answer=9.0)
    assert not endpoints.stopped_answering(replica, sent_at=10.0, now=10.04, after=0.05)  # not waited long enough
    assert endpoints.stopped_answering(replica, sent_at=10.0, now=10.06, after=0.05)  # waited, nothing came back
    replica.last_answer = 10.03  # it answered another call meanwhile: busy, not hung
    assert not endpoints.stopped_answering(replica, sent_at=10.0, now=10.06, after=0.05)


def test_choose_prefers_fewest_in_flight_and_takes_turns_among_equals():
    a, b, c = Endpoint("a:1"), Endpoint("b:1"), Endpoint("c:1")
    assert [endpoints.choose([a, b, c], turn).address for turn in range(3)] == ["a:1", "b:1", "c:1"]
    a.inflight, b.inflight = 2, 1
    assert endpoints.choose([a, b, c], 0) is c
    c.up = False
    assert endpoints.choose([a, b, c], 0) is b
    assert endpoints.choose([a, b, c], 0, exclude=[b]) is a
    a.up = b.up = False
    assert endpoints.choose([a, b, c], 0) is None


def test_latency_p99_comes_from_recent_answers():
    latency = endpoints.Latency()
    for _ in range(7):
        latency.add(0.002)
    assert latency.p99 is None  # too few to say
    latency.add(0.002)
    assert latency.p99 == pytest.approx(0.002)
    for _ in range(300):  # the window moves on: old, fast answers no longer count
        latency.add(0.010)
    assert latency.p99 == pytest.approx(0.010)


def test_a_hedge_waits_the_fixed_delay_or_the_targets_recent_quantile_whichever_is_longer():
    latency = endpoints.Latency()
    assert endpoints.hedge_after(0.0, 0.0, latency) is None  # hedging off
    assert endpoints.hedge_after(0.020, 0.0, latency) == pytest.approx(0.020)
    assert endpoints.hedge_after(0.0, 0.95, latency) is None  # no answers yet: no quantile, no fixed delay
    assert endpoints.hedge_after(0.005, 0.95, latency) == pytest.approx(0.005)  # meanwhile the fixed one
    for i in range(128):
        latency.add(0.001 * (i + 1))  # 1..128 ms; the order is recomputed every 32 answers
    assert latency.quantile(0.95) == pytest.approx(0.122)
    latency.add(1.0)  # not yet counted: no sort per answer
    assert endpoints.hedge_after(0.0, 0.95, latency) == pytest.approx(0.122)
    assert endpoints.hedge_after(0.200, 0.95, latency) == pytest.approx(0.200)  # the fixed delay as a floor
    assert endpoints.hedge_after(0.0, 0.5, latency) == pytest.approx(0.065)


def test_eject_and_rejoin_tell_listeners_once():
    events = []
    replicas = EndpointSet("tcp://a:1,b:1", ["a:1", "b:1"])
    replicas.listeners.append(lambda target, endpoint, event, why: events.append((endpoint, event, why)))
    a, b = replicas.endpoints
    assert replicas.eject(a, "stopped answering", now=5.0)
    assert not replicas.eject(a, "stopped answering", now=5.1)  # already out
    assert replicas.pick() is b and replicas.pick() is b  # calls go to the other replica only
    assert a.describe(5.8) == "a:1 stopped answering 800 ms ago"
    assert replicas.rejoin(a) and not replicas.rejoin(a)
    assert events == [("a:1", endpoints.EJECTED, "stopped answering"), ("a:1", endpoints.UP, "")]
    assert replicas.pick() is a  # b has two calls in flight, a none


def test_a_new_address_list_keeps_known_replicas_and_their_state():
    events = []
    replicas = EndpointSet("tcp://svc:1", [])
    replicas.listeners.append(lambda target, endpoint, event, why: events.append((endpoint, event)))
    replicas.replace(["10.0.0.1:1", "10.0.0.2:1"])
    first, second = replicas.endpoints
    replicas.eject(second, "refused the connection")
    dropped = replicas.replace(["10.0.0.2:1", "10.0.0.3:1"])
    assert dropped == [first]
    assert events == [("10.0.0.1:1", endpoints.ADDED), ("10.0.0.2:1", endpoints.ADDED),
                      ("10.0.0.2:1", endpoints.EJECTED), ("10.0.0.3:1", endpoints.ADDED),
                      ("10.0.0.1:1", endpoints.GONE)]  # each resolved address is reported, and each dropped one
    assert replicas.endpoints[0] is second and not second.up  # still ejected: a new DNS answer is no probe
    assert replicas.endpoints[1].address == "10.0.0.3:1" and replicas.endpoints[1].up
