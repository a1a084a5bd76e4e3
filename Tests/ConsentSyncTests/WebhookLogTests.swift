import ConsentServer
import Foundation
import HTTPTypes
import Logging
import NIOCore
import Testing

/// Each webhook request leaves one `delivery` line carrying the request's fields.
@Suite("Webhook log lines")
struct WebhookLogTests {
    @Test("applied, failed and stored deliveries: request, principal, delivery and outcome fields with status and time")
    func admitted() async throws {
        let (logger, storage) = RecordingLogHandler.logger()
        try await AgentHarness.run(logger: logger) { agent in
            let body = Didomi.user(id: "log-user", version: 1, updatedAt: "2025-03-01T00:00:00Z",
                                   purposes: #"[{"id":"a","enabled":true}]"#)
            let applied = try await agent.client.execute(
                uri: "/webhooks/didomi", method: .post,
                headers: [.contentType: "application/json", .xRequestIDForTests: "req-applied-1"],
                body: ByteBuffer(string: body))
            #expect(applied.status == .ok)
            let failed = try await agent.post(body: "{ not json")
            #expect(failed.status == .badRequest)
            let stored = try await agent.post(body: #"{"type":"user.merged","parameters":{"entity":{"id":"u","organization_id":"o"}}}"#)
            #expect(stored.outcome == "stored")

            let lines = storage.lines("delivery")
            #expect(lines.count == 3)
            let expectedKeys: Set<String> = ["request_id", "endpoint", "principal", "delivery_id", "outcome", "status", "ms"]
            for line in lines {
                #expect(Set(line.metadata.keys).isSuperset(of: expectedKeys), "\(line.metadata)")
                #expect(line.metadata["endpoint"] == "didomi")
                #expect(line.metadata["principal"] == "auth-disabled")
                #expect(Double(line.metadata["ms"] ?? "") != nil)
                #expect(line.level == .info)
            }
            let first = try #require(lines.first { $0.metadata["request_id"] == "req-applied-1" })
            #expect(first.metadata["outcome"] == "applied")
            #expect(first.metadata["status"] == "200")
            #expect(lines.contains { $0.metadata["outcome"] == "failed" && $0.metadata["status"] == "400" })
            #expect(lines.contains { $0.metadata["outcome"] == "stored" && $0.metadata["status"] == "200" })

            let storedWarning = try #require(storage.lines("delivery stored, not applied").first)
            #expect(storedWarning.level == .warning)
            for key in ["request_id", "endpoint", "principal", "delivery_id", "outcome", "reason"] {
                #expect(storedWarning.metadata[key] != nil, "\(key) in \(storedWarning.metadata)")
            }
        }
    }

    @Test("no email address at info level or above: user snapshots, a deletion, a citizen email, a bad body")
    func noPersonalData() async throws {
        let (logger, storage) = RecordingLogHandler.logger()
        try await AgentHarness.run(logger: logger) { agent in
            try await agent.postFixture("didomi/webhooks/nested/user.created.json")
            try await agent.postFixture("didomi/webhooks/nested/user.deleted.json")
            let email = try String(contentsOfFile: TestDatabase.fixtures + "/dataguard/webhooks/citizen-email.SPECULATIVE.json", encoding: .utf8)
            #expect(try await agent.post("/webhooks/dataguard/citizen-emails", body: email).outcome == "stored")
            let bad = try await agent.post(body: #"{"type":"user.updated","parameters":{"entity":{"id":"u","organization_id":"o","organization_user_id":"dave@example.com","version":"dave@example.com"}}}"#)
            #expect(bad.status == .badRequest)

            let lines = storage.lines.withLockedValue { $0 }.filter { $0.level >= .info }
            #expect(lines.count >= 4)
            for line in lines {
                let text = "\(line.message) \(line.metadata)"
                #expect(!text.contains("@example.com"), "\(line.level): \(text)")
            }
        }
    }

    @Test("a refused delivery: the refusal and the delivery line carry the request and the status, no principal")
    func refused() async throws {
        let (logger, storage) = RecordingLogHandler.logger()
        try await AgentHarness.run(configure: AuthTests.enabled(), logger: logger) { agent in
            let reply = try await agent.post(body: "{}")
            #expect(reply.status == .unauthorized)
            let refusal = try #require(storage.lines("delivery refused at admission").first)
            #expect(refusal.level == .notice)
            #expect(Set(refusal.metadata.keys) == ["request_id", "endpoint", "status"])
            #expect(refusal.metadata["status"] == "401")
            let delivery = try #require(storage.lines("delivery").first)
            #expect(Set(delivery.metadata.keys) == ["request_id", "endpoint", "status", "ms"])
            #expect(delivery.metadata["request_id"] == refusal.metadata["request_id"])
        }
    }
}

extension HTTPField.Name {
    static let xRequestIDForTests = Self("X-Request-Id")!
}
