#!/usr/bin/env node
// A SessionService client written with @grpc/grpc-js, loading the published
// proto/ambient/v1/sessions.proto at run time: what a non-Python runner or
// tool does. tests/foreign/test_node_client.py drives it against our server.
//
//   node client.js create   --name N
//   node client.js push     --session S --event-type T --payload P
//   node client.js roundtrip --session S --payload P
//       pushes P, watches from seq 0, and once that message is replayed
//       pushes P + "-live" and waits for it on the same watch
//
// Environment: TARGET (host:port, required), TOKEN (sent as
// "authorization: Bearer <TOKEN>" when set), AUTHORIZATION (the raw
// authorization value, instead of TOKEN), DEADLINE_MS (default 10000).
// Output: one JSON object per line on stdout. A failed call prints
// {"error": {"code": <number>, "status": "<NAME>", "details": "..."}} and
// exits 3; usage errors exit 2.
"use strict";

const path = require("node:path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTO_ROOT = path.resolve(__dirname, "..", "..", "proto");
const definition = protoLoader.loadSync("ambient/v1/sessions.proto", {
  includeDirs: [PROTO_ROOT],
  keepCase: true,
  longs: String,
  enums: String,
  defaults: true,
  oneofs: true,
});
const { SessionService } = grpc.loadPackageDefinition(definition).ambient.v1;

function usage(message) {
  process.stderr.write(`client.js: ${message}\n`);
  process.exit(2);
}

function parseArgs(argv) {
  const [command, ...rest] = argv;
  const options = {};
  for (let i = 0; i < rest.length; i += 2) {
    if (!rest[i].startsWith("--") || i + 1 >= rest.length) usage(`bad argument ${rest[i]}`);
    options[rest[i].slice(2)] = rest[i + 1];
  }
  return { command, options };
}

function statusName(code) {
  return Object.keys(grpc.status).find((name) => grpc.status[name] === code) || String(code);
}

function fail(error) {
  const out = { error: { code: error.code, status: statusName(error.code), details: error.details } };
  process.stdout.write(JSON.stringify(out) + "\n");
  process.exit(3);
}

function emit(object) {
  process.stdout.write(JSON.stringify(object) + "\n");
}

function callMetadata() {
  const metadata = new grpc.Metadata();
  if (process.env.AUTHORIZATION !== undefined) {
    metadata.set("authorization", process.env.AUTHORIZATION);
  } else if (process.env.TOKEN) {
    metadata.set("authorization", `Bearer ${process.env.TOKEN}`);
  }
  return metadata;
}

function deadline() {
  return new Date(Date.now() + Number(process.env.DEADLINE_MS || 10000));
}

function unary(client, method, request) {
  return new Promise((resolve, reject) => {
    client[method](request, callMetadata(), { deadline: deadline() }, (error, reply) =>
      error ? reject(error) : resolve(reply),
    );
  });
}

function message(m) {
  return { id: m.id, session_id: m.session_id, seq: Number(m.seq), event_type: m.event_type, payload: m.payload };
}

async function roundtrip(client, sessionId, payload) {
  await unary(client, "PushSessionMessage", { session_id: sessionId, event_type: "foreign", payload });
  return new Promise((resolve, reject) => {
    const call = client.WatchSessionMessages(
      { session_id: sessionId, after_seq: 0 },
      callMetadata(),
      { deadline: deadline() },
    );
    let done = false;
    call.on("data", (m) => {
      emit(message(m));
      if (m.payload === payload) {
        // The replay reached our message, so the watch is live: this push
        // must arrive on the same stream.
        unary(client, "PushSessionMessage", {
          session_id: sessionId,
          event_type: "foreign",
          payload: `${payload}-live`,
        }).catch(reject);
      } else if (m.payload === `${payload}-live`) {
        done = true;
        call.cancel();
        resolve();
      }
    });
    call.on("error", (error) => {
      if (done && error.code === grpc.status.CANCELLED) return;
      reject(error);
    });
    call.on("end", () => {
      if (!done) reject({ code: grpc.status.UNKNOWN, details: "watch ended early" });
    });
  });
}

async function main() {
  const { command, options } = parseArgs(process.argv.slice(2));
  const target = process.env.TARGET;
  if (!target) usage("TARGET is required");
  const client = new SessionService(target, grpc.credentials.createInsecure());
  try {
    if (command === "create") {
      const session = await unary(client, "CreateSession", { name: options.name || "foreign" });
      emit({ id: session.metadata.id, name: session.name, created_by_user_id: session.created_by_user_id });
    } else if (command === "push") {
      const reply = await unary(client, "PushSessionMessage", {
        session_id: options.session,
        event_type: options["event-type"],
        payload: options.payload,
      });
      emit(message(reply));
    } else if (command === "roundtrip") {
      await roundtrip(client, options.session, options.payload);
    } else {
      usage(`unknown command ${command}`);
    }
  } catch (error) {
    fail(error);
  } finally {
    client.close();
  }
}

main();
