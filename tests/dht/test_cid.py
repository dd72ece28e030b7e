"""Content IDs: CIDv1 raw + sha2-256, as IPFS computes them."""

from __future__ import annotations

import hashlib

import pytest

from lattica_ray.dht.cid import CODEC_DAG_PB, CODEC_RAW, ContentId
from lattica_ray.dht.errors import InvalidContentId


def test_cid_matches_ipfs() -> None:
    # `ipfs add --cid-version=1 --raw-leaves` of "hello world" (no newline)
    cid = ContentId.of(b"hello world")
    assert str(cid) == "bafkreifzjut3te2nhyekklss27nh3k72ysco7y32koao5eei66wof36n5e"
    assert cid.multihash == b"\x12\x20" + hashlib.sha256(b"hello world").digest()
    assert cid.codec == CODEC_RAW


def test_round_trips() -> None:
    cid = ContentId.of(b"\x00" * 1000)
    assert ContentId.parse(str(cid)) == cid
    assert ContentId.from_bytes(cid.to_bytes()) == cid
    v0 = ContentId.parse("QmaozNR7DZHQK1ZcU9p7QdrshMvXqWK6gpu5rmrkPdT3L4")
    assert v0.codec == CODEC_DAG_PB
    assert v0.multihash == ContentId.of(b"hello world").multihash


def test_verify_detects_other_bytes() -> None:
    cid = ContentId.of(b"payload")
    assert cid.verify(b"payload")
    assert not cid.verify(b"payloaD")


@pytest.mark.parametrize("text", ["", "zzz", "bafkrei!!!", "b" + "a" * 10, "Qm" + "1" * 44])
def test_garbage_is_refused(text: str) -> None:
    with pytest.raises(InvalidContentId):
        ContentId.parse(text)
