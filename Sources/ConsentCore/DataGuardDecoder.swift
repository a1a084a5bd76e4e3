import Crypto
import Foundation

/// Decodes DataGuard CPM webhook bodies (DOMAIN §3.4) into change sets.
///
/// Pure: no I/O. DataGuard sends no event or delivery id: a delivery is identified by the SHA-256 of
/// its canonical JSON without `sentAt` (a retry re-stamps `sentAt`), and each permission by its
/// `transactionId`, each preference by its `submissionId`. Permissions are ordered by `obtainedAt`,
/// then `recordedAt`, then `transactionId`; preferences by `updatedAt`, then `submissionId` (else the
/// selected choices).
public enum DataGuardDecoder {
    public static let source = "dataguard"

    /// The three webhook types, one endpoint each.
    public enum Kind: String, Sendable, CaseIterable {
        case effectivePermissions = "effective-permissions"
        case consentReceipts = "consent-receipts"
        case citizenEmails = "citizen-emails"

        public var endpoint: String { "dataguard.\(rawValue)" }
    }

    /// `state` values and what they become (null = `unset`).
    public static let states: [String: ConsentStatus] = [
        "GRANTED": .granted, "DENIED": .denied, "PENDING": .pending, "CLAIMED": .claimed,
        "OBJECTED": .objected, "OBJECTION_UPHELD": .objectionUpheld,
    ]

    /// Decodes a body of the given kind. A body that cannot be applied becomes `.reject` with the reason.
    public static func decode(_ kind: Kind, _ body: Data, receivedAt: Date) -> ChangeSet {
        do {
            let document = try JSONValue.parse(body)
            guard case .object = document else {
                throw PayloadError("body must be a JSON object, got \(document.typeName)")
            }
            switch kind {
            case .citizenEmails: return try email(document)
            case .effectivePermissions, .consentReceipts: return try permissions(kind, document, webhook: true)
            }
        } catch let error as PayloadError {
            return .rejected(endpoint: kind.endpoint, source: source, reason: error.message)
        } catch {
            return .rejected(endpoint: kind.endpoint, source: source, reason: "\(error)")
        }
    }

    /// A citizen's effective permissions object (webhook body or API item) as a full state. Items
    /// with a state or justification this agent does not know are left out (and named in `reason`).
    public static func effectivePermissions(_ document: JSONValue) throws -> ChangeSet {
        guard case .object = document else {
            throw PayloadError("an effective-permissions object must be a JSON object, got \(document.typeName)")
        }
        return try permissions(.effectivePermissions, document)
    }

    /// Hex SHA-256 of the body's canonical JSON (sorted keys) without the top-level `sentAt`.
    static func contentKey(_ document: JSONValue) -> String {
        var stripped = document
        if case .object(var members) = document {
            members["sentAt"] = nil
            stripped = .object(members)
        }
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        let canonical = (try? encoder.encode(stripped)) ?? Data()
        return SHA256.hash(data: canonical).map { String(format: "%02x", $0) }.joined()
    }

    private static func permissions(_ kind: Kind, _ document: JSONValue, webhook: Bool = false) throws -> ChangeSet {
        let root = Field(document, path: "")
        let tenant = try root["applicationId"].identifier()
        let citizen = try root["citizenId"].identifier()
        let externalRef = try root["externalRef"].optionalString()
        let sentAt = try root["sentAt"].optionalTimestamp()
        if kind == .effectivePermissions && root["permissions"].isMissing {
            throw PayloadError("required field 'permissions' is missing")
        }
        let permissions = try root["permissions"].optionalArray() ?? []
        var items: [ChangeSet.Item] = []
        var unknown: [String] = []
        for index in permissions.indices {
            let field = root["permissions"].indexed(index, permissions[index])
            _ = try field.object()
            let option = try field["optionId"].identifier()
            let state = try field["state"].optionalString()
            guard let justification = try field["justification"].optionalString() else {
                // DOMAIN §3.5: no recorded state is `null` ("No Justification"). In a citizen's effective
                // permissions that is the absence of a permission for the option; a receipt carrying it,
                // or a state without a justification, is kept for a person to look at.
                if kind == .consentReceipts || state != nil {
                    unknown.append("permission without a justification (\(field.path))")
                }
                continue
            }
            let transaction = try field["transactionId"].identifier()
            let recordedAt = try field["recordedAt"].timestamp()
            let obtainedAt = try field["obtainedAt"].optionalTimestamp() ?? recordedAt
            let validFrom = try field["validFrom"].optionalTimestamp()
            let validUntil = try field["validUntil"].optionalTimestamp()
            let optionType = try field["optionType"].optionalString()

            let basisName = justification.replacingOccurrences(of: "-", with: "_")
            guard let basis = LawfulBasis(rawValue: basisName) else {
                unknown.append("justification '\(justification)' (\(field.path))")
                continue
            }
            let status: ConsentStatus
            if let state {
                guard let known = states[state] else {
                    unknown.append("state '\(state)' (\(field.path))")
                    continue
                }
                // DOMAIN §3.5: each basis takes its own states, and DataGuard refuses any other pair. One
                // that comes anyway is kept for a person to look at, never shown as in force.
                guard Self.allowedStates(basis).contains(known) else {
                    unknown.append("state '\(state)' with justification '\(justification)' (\(field.path))")
                    continue
                }
                status = known
            } else {
                status = .unset
            }
            var item = ChangeSet.Item(kind: "purpose", id: option, basis: basis, status: status, raw: state ?? "null")
            item.optionType = optionType
            item.validFrom = validFrom
            item.validUntil = validUntil
            item.at = obtainedAt
            item.at2 = recordedAt
            item.tie = transaction
            item.cause = "dataguard:transaction:\(transaction)"
            item.provenance = provenance(field, transaction: transaction)
            items.append(item)
        }
        // A webhook snapshot replaces the stored state: without its preference list it would remove every
        // stored preference, so the list is required ([] when there are none).
        if webhook && kind == .effectivePermissions && root["preferences"].isMissing {
            throw PayloadError("required field 'preferences' is missing")
        }
        let prefs = try preferences(root, kind, webhook: webhook, unknown: &unknown)
        var change = try build(kind, tenant, citizen, externalRef, sentAt, document, items, prefs)
        if !unknown.isEmpty {
            change.action = .store
            change.reason = "unknown \(unknown.joined(separator: ", ")): kept, not applied"
        }
        return change
    }

    /// The states DataGuard allows for a lawful basis (DOMAIN §3.5).
    static func allowedStates(_ basis: LawfulBasis) -> Set<ConsentStatus> {
        switch basis {
        case .consent: [.granted, .denied, .pending]
        case .legitimateInterest: [.claimed, .objected, .objectionUpheld]
        case .contract, .publicInterest, .vitalInterest, .legalObligation: [.claimed]
        }
    }

    private static func build(
        _ kind: Kind, _ tenant: String, _ citizen: String, _ externalRef: String?, _ sentAt: String?,
        _ document: JSONValue, _ items: [ChangeSet.Item], _ prefs: [ChangeSet.Preference]
    ) throws -> ChangeSet {
        var change = ChangeSet(endpoint: kind.endpoint, source: source,
                               action: kind == .effectivePermissions ? .dataguardSnapshot : .dataguardReceipt)
        change.type = kind.rawValue
        change.tenant = tenant
        change.user = citizen
        change.regulation = ""
        change.key = "\(kind.rawValue):" + contentKey(document)
        change.at = sentAt
        change.cause = "dataguard:\(kind.rawValue)"
        var info = ChangeSet.UserInfo()
        info.externalRef = externalRef
        change.userInfo = info
        change.items = items
        change.prefs = prefs
        return change
    }

    /// A preference's `choices` are its whole selection, and replace the stored one: a webhook's preference
    /// must carry them (`[]` when nothing is selected); without them it would clear the selection. In a
    /// snapshot that is a malformed full state (400); a receipt, whose shape DataGuard does not document
    /// (DOMAIN §5 item 17), is kept for a person to look at, as an unknown value is.
    private static func preferences(_ root: Field, _ kind: Kind, webhook: Bool, unknown: inout [String]) throws -> [ChangeSet.Preference] {
        guard let elements = try root["preferences"].optionalArray() else { return [] }
        var preferences: [ChangeSet.Preference] = []
        for index in elements.indices {
            let field = root["preferences"].indexed(index, elements[index])
            _ = try field.object()
            let reference = try field["preference"].identifier()
            let updatedAt = try field["updatedAt"].timestamp()
            let submission = try field["submissionId"].optionalName()
            var choices: [String] = []
            var labels: [String: JSONValue] = [:]
            if webhook && field["choices"].isMissing {
                guard kind == .consentReceipts else { throw PayloadError("required field '\(field["choices"].path)' is missing") }
                unknown.append("preference without choices (\(field.path))")
                continue
            }
            for (choiceIndex, choice) in (try field["choices"].optionalArray() ?? []).enumerated() {
                let choiceField = field["choices"].indexed(choiceIndex, choice)
                let id = try choiceField["reference"].identifier()
                choices.append(id)
                if let label = try choiceField["label"].optionalString() { labels[id] = .string(label) }
            }
            var preference = ChangeSet.Preference(purpose: nil, pref: reference, values: choices)
            preference.at = updatedAt
            preference.at2 = updatedAt
            // Equal updatedAt without a submissionId: the choices decide, never the arrival order.
            preference.tie = submission ?? "choices:" + choices.sorted().joined(separator: ",")
            preference.cause = submission.map { "dataguard:submission:\($0)" } ?? "dataguard:preference:\(reference)"
            var provenance: [String: JSONValue] = ["choice_labels": .object(labels)]
            if let label = try field["label"].optionalString() { provenance["label"] = .string(label) }
            if let submission { provenance["submission_id"] = .string(submission) }
            preference.provenance = .object(provenance)
            preferences.append(preference)
        }
        return preferences
    }

    /// The provenance fields of a permission, kept queryable as JSON.
    private static func provenance(_ field: Field, transaction: String) -> JSONValue {
        var members: [String: JSONValue] = ["transaction_id": .string(transaction)]
        let names = [
            "channel", "campaign", "privacyPolicyId", "privacyPolicyRef", "permissionStatementId",
            "permissionStatementRef", "recordedBy", "recordedByName", "recordedClient", "recordedClientName",
            "delegatedAuthorityId", "delegatedAuthorityName",
        ]
        for name in names {
            if let value = field[name].value, value != .null { members[name] = value }
        }
        return .object(members)
    }

    /// Citizen emails: not consent state. Any JSON object is kept in the outbox for a mailer.
    private static func email(_ document: JSONValue) throws -> ChangeSet {
        let root = Field(document, path: "")
        var change = ChangeSet(endpoint: Kind.citizenEmails.endpoint, source: source, action: .dataguardEmail)
        change.type = Kind.citizenEmails.rawValue
        change.tenant = try? root["applicationId"].identifier()
        change.user = try? root["citizenId"].identifier()
        change.key = "citizen-emails:" + contentKey(document)
        var info = ChangeSet.UserInfo()
        info.externalRef = try? root["externalRef"].identifier()
        change.userInfo = info
        change.email = document
        return change
    }
}
