// An independent HBONE client (Node.js's http2, built on nghttp2) for tests/tunnel/test_hbone_interop.py.
//
// usage: node hbone_interop.mjs <host> <port> <authority> <cert.pem> <key.pem> <ca.pem> <server spiffe id> <payload>
// Connects with TLS + ALPN h2 and the given workload certificate, checks the server presents the
// expected SPIFFE id, sends one CONNECT to <authority>, writes <payload>, ends the stream
// (END_STREAM), reads until the server's END_STREAM, and prints one JSON line:
// {"alpn": ..., "status": ..., "reply": ...}.
import fs from "node:fs";
import http2 from "node:http2";

const [host, port, authority, certFile, keyFile, caFile, serverId, payload] = process.argv.slice(2);
const out = { alpn: null, status: null, reply: "", error: null };
const done = (code) => {
  process.stdout.write(JSON.stringify(out) + "\n");
  process.exit(code);
};
setTimeout(() => { out.error = "timeout"; done(2); }, 10000).unref();

const session = http2.connect(`https://${host}:${port}`, {
  cert: fs.readFileSync(certFile),
  key: fs.readFileSync(keyFile),
  ca: fs.readFileSync(caFile),
  ALPNProtocols: ["h2"],
  minVersion: "TLSv1.3",
  // SPIFFE ids are URI SANs, not host names: check the id instead of the host.
  checkServerIdentity: (_host, cert) =>
    (cert.subjectaltname || "").split(", ").includes(`URI:${serverId}`)
      ? undefined
      : new Error(`server is ${cert.subjectaltname}, expected ${serverId}`),
});
session.on("error", (err) => { out.error = String(err); done(1); });
session.on("connect", (s, socket) => { out.alpn = socket.alpnProtocol; });

const stream = session.request({
  ":method": "CONNECT",
  ":authority": authority,
  forwarded: 'for="198.51.100.7:4242"',
  baggage: "k8s.namespace.name=client,k8s.pod.name=node-interop",
});
stream.on("response", (headers) => {
  out.status = headers[":status"];
  if (out.status === 200) {
    stream.end(payload); // DATA, then END_STREAM: the app sees EOF and answers
  }
});
stream.on("data", (chunk) => { out.reply += chunk.toString("latin1"); });
stream.on("end", () => { session.close(); done(0); });
stream.on("error", (err) => { out.error = String(err); session.close(); done(0); });
