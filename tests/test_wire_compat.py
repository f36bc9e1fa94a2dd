"""Wire compatibility with stubs generated elsewhere from the platform's protos.

The platform's own proto has the same package, service, method names and
field numbers, but more Session fields and a different file layout. Stubs
generated from such a file (here: at test time, with grpcio-tools, in a child
process so the two descriptor sets never share a pool) must interoperate with
our server and our stubs.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from ambient_grpc_auth.proto.ambient.v1 import sessions_pb2
from ambient_grpc_auth.reference.servicer import serve
from ambient_grpc_auth.reference.store import SessionStore

PLATFORM_PROTO = """
syntax = "proto3";
package ambient.v1;
option go_package = "example.invalid/platform/ambient/v1;ambientv1";
import "google/protobuf/timestamp.proto";

message ObjectReference {
  string id = 1;
  google.protobuf.Timestamp created_at = 2;
  google.protobuf.Timestamp updated_at = 3;
  string kind = 4;
  string href = 5;
}
message Session {
  ObjectReference metadata = 1;
  string name = 2;
  optional string repo_url = 3;
  optional string prompt = 4;
  optional string created_by_user_id = 5;
  optional string assigned_user_id = 6;
  optional string workflow_id = 7;
  optional string project_id = 20;
  optional string phase = 31;
}
message CreateSessionRequest {
  string name = 1;
  optional string repo_url = 2;
  optional string prompt = 3;
  optional string project_id = 19;
}
message GetSessionRequest { string id = 1; }
message SessionMessage {
  string id = 1;
  string session_id = 2;
  int64 seq = 3;
  string event_type = 4;
  string payload = 5;
  google.protobuf.Timestamp created_at = 6;
}
message PushSessionMessageRequest {
  string session_id = 1;
  string event_type = 2;
  string payload = 3;
}
message WatchSessionMessagesRequest {
  string session_id = 1;
  int64 after_seq = 2;
}
service SessionService {
  rpc GetSession(GetSessionRequest) returns (Session);
  rpc CreateSession(CreateSessionRequest) returns (Session);
  rpc PushSessionMessage(PushSessionMessageRequest) returns (SessionMessage);
  rpc WatchSessionMessages(WatchSessionMessagesRequest) returns (stream SessionMessage);
}
"""

CLIENT = textwrap.dedent(
    """
    import json, sys
    import grpc
    from ambient.v1 import platform_sessions_pb2 as pb, platform_sessions_pb2_grpc as pbg

    stub = pbg.SessionServiceStub(grpc.insecure_channel(sys.argv[1]))
    created = stub.CreateSession(
        pb.CreateSessionRequest(name="interop", project_id="proj-1", prompt="not modelled here"),
        timeout=10,
    )
    sid = created.metadata.id
    for i in range(3):
        stub.PushSessionMessage(
            pb.PushSessionMessageRequest(session_id=sid, event_type="assistant", payload=f"p{i}"),
            timeout=10,
        )
    watched = []
    for message in stub.WatchSessionMessages(
        pb.WatchSessionMessagesRequest(session_id=sid, after_seq=1), timeout=10
    ):
        watched.append([message.seq, message.payload, message.session_id == sid])
        if len(watched) == 2:
            break
    got = stub.GetSession(pb.GetSessionRequest(id=sid), timeout=10)
    print(json.dumps({
        "id": sid, "name": got.name, "project_id": got.project_id,
        "kind": got.metadata.kind, "watched": watched,
        "has_created_at": got.metadata.HasField("created_at"),
    }))
    """
)


@pytest.fixture(scope="module")
def platform_stubs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    grpc_tools = pytest.importorskip("grpc_tools.protoc")
    root = tmp_path_factory.mktemp("platform")
    (root / "proto" / "ambient" / "v1").mkdir(parents=True)
    (root / "proto" / "ambient" / "v1" / "platform_sessions.proto").write_text(PLATFORM_PROTO)
    out = root / "gen"
    out.mkdir()
    import importlib.resources

    well_known = str(importlib.resources.files("grpc_tools") / "_proto")
    rc = grpc_tools.main(
        [
            "protoc",
            f"-I{root / 'proto'}",
            f"-I{well_known}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            "ambient/v1/platform_sessions.proto",
        ]
    )
    assert rc == 0
    return out


@pytest.fixture
def server() -> Iterator[str]:
    store = SessionStore(":memory:")
    srv, port = serve(store)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        srv.stop(None)
        store.close()


def test_platform_stubs_talk_to_our_server(platform_stubs: Path, server: str) -> None:
    result = subprocess.run(
        [sys.executable, "-c", CLIENT, server],
        env={"PYTHONPATH": str(platform_stubs), "PATH": ""},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen["name"] == "interop"
    assert seen["project_id"] == "proj-1"
    assert seen["kind"] == "Session"
    assert seen["has_created_at"] is True
    assert seen["watched"] == [[2, "p1", True], [3, "p2", True]]


def test_platform_session_bytes_parse_with_our_stubs(platform_stubs: Path) -> None:
    """A platform Session with fields we do not model still parses; the
    fields we do model keep their values, and unknown ones survive a round
    trip."""
    script = textwrap.dedent(
        """
        import sys
        from ambient.v1 import platform_sessions_pb2 as pb
        s = pb.Session(name="n", created_by_user_id="alice", project_id="p", phase="R", prompt="x")
        s.metadata.id = "abc"
        sys.stdout.write(s.SerializeToString().hex())
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        env={"PYTHONPATH": str(platform_stubs), "PATH": ""},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    data = bytes.fromhex(result.stdout)
    ours = sessions_pb2.Session.FromString(data)
    assert (ours.metadata.id, ours.name, ours.created_by_user_id, ours.project_id) == (
        "abc",
        "n",
        "alice",
        "p",
    )
    # Unknown fields (prompt, phase) are kept, so relaying does not drop them.
    check = textwrap.dedent(
        """
        import sys
        from ambient.v1 import platform_sessions_pb2 as pb
        s = pb.Session.FromString(bytes.fromhex(sys.argv[1]))
        print(s.phase, s.prompt, s.created_by_user_id)
        """
    )
    relayed = subprocess.run(
        [sys.executable, "-c", check, ours.SerializeToString().hex()],
        env={"PYTHONPATH": str(platform_stubs), "PATH": ""},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert relayed.stdout.split() == ["R", "x", "alice"]


@pytest.mark.parametrize(
    ("message", "fields"),
    [
        (
            "SessionMessage",
            {"id": 1, "session_id": 2, "seq": 3, "event_type": 4, "payload": 5, "created_at": 6},
        ),
        ("PushSessionMessageRequest", {"session_id": 1, "event_type": 2, "payload": 3}),
        ("WatchSessionMessagesRequest", {"session_id": 1, "after_seq": 2}),
        ("Session", {"metadata": 1, "name": 2, "created_by_user_id": 5, "project_id": 20}),
        ("ObjectReference", {"id": 1, "created_at": 2, "updated_at": 3, "kind": 4, "href": 5}),
        ("CreateSessionRequest", {"name": 1, "project_id": 19}),
        ("GetSessionRequest", {"id": 1}),
    ],
)
def test_field_numbers_are_the_contract(message: str, fields: dict[str, int]) -> None:
    descriptor = sessions_pb2.DESCRIPTOR.message_types_by_name[message]
    assert {f.name: f.number for f in descriptor.fields} == fields
    assert descriptor.full_name == f"ambient.v1.{message}"


def test_service_methods_are_the_contract() -> None:
    service = sessions_pb2.DESCRIPTOR.services_by_name["SessionService"]
    assert service.full_name == "ambient.v1.SessionService"
    shapes = {
        m.name: (m.input_type.name, m.output_type.name, m.server_streaming) for m in service.methods
    }
    assert shapes == {
        "GetSession": ("GetSessionRequest", "Session", False),
        "CreateSession": ("CreateSessionRequest", "Session", False),
        "PushSessionMessage": ("PushSessionMessageRequest", "SessionMessage", False),
        "WatchSessionMessages": ("WatchSessionMessagesRequest", "SessionMessage", True),
    }
    assert not any(m.client_streaming for m in service.methods)
    _ = grpc  # the generated stubs depend on it
