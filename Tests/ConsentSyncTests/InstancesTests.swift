import ConsentServer
import ConsentStore
import Foundation
import HTTPTypes
import Testing

/// PRODUCT §8: several agents on one database, with no state of their own.
@Suite("Several instances on one database")
struct InstancesTests {
    @Test("two agents: a token from one is good at the other; conflicting and duplicate deliveries split across both end in the newest state, each key applied once")
    func twoAgents() async throws {
        let auth = AuthTests.enabled()
        try await AgentHarness.run(configure: auth) { first in
            try await AgentHarness.run(configure: auth, databaseURL: first.url) { second in
                let (id, secret) = try await AuthTests().createClient(first)
                let minted = try await AuthTests().token(first, id: id, secret: secret)
                let token = try #require(minted.json["access_token"] as? String, "\(minted.json)")
                let bearer = [("Authorization", "Bearer \(token)")]

                // Every version is delivered twice, once to each agent, all at the same time and in
                // random order.
                let versions = Array(1...20)
                let outcomes = try await withThrowingTaskGroup(of: (Int, String).self) { group in
                    for version in versions {
                        let body = Didomi.user(version: version, updatedAt: String(format: "2025-03-01T00:%02d:00Z", version),
                                               purposes: "[{\"id\":\"a\",\"enabled\":\(version % 2 == 0)},{\"id\":\"v\(version)\",\"enabled\":true}]")
                        for agent in [first, second].shuffled() {
                            group.addTask {
                                let reply = try await agent.post(body: body, headers: bearer)
                                #expect(reply.status == .ok, "\(reply.status) \(reply.json)")
                                return (version, reply.outcome ?? "\(reply.status)")
                            }
                        }
                    }
                    var outcomes: [Int: [String]] = [:]
                    for try await (version, outcome) in group { outcomes[version, default: []].append(outcome) }
                    return outcomes
                }
                for version in versions {
                    let answers = (outcomes[version] ?? []).sorted()
                    #expect(answers.count == 2 && answers.filter { $0 == "duplicate" }.count == 1
                                && answers.contains { $0 == "applied" || $0 == "stale" },
                            "version \(version): \(answers)")
                }
                // Whichever agent answered, the stored state is the newest delivery's, seen from either.
                #expect(try await first.consents(user: "u-1") == ["a": "granted", "v20": "granted"])
                #expect(try await second.scalar("select version from consent.current_users where user_id = 'u-1'", as: Int64.self) == 20)
                #expect(try await first.count("select count(*)::int from consent.delivery_keys") == 20)
            }
        }
    }
}
