import Foundation

/// A delivery decoded into what it means for the database: the input of `consent.apply_batch`.
///
/// Pure data. The decoders build it from payload bytes; the store encodes a batch of them as JSON and
/// lets PostgreSQL apply them in one transaction (sql/002_apply.sql reads exactly these keys).
/// The apply path writes them with `ChangeSet.jsonArray` (JSONWriter.swift); the `Encodable`
/// conformance below is the reference it is tested against, so a key changes in both places.
public struct ChangeSet: Sendable, Encodable, Equatable {
    /// What the database should do with the delivery.
    public enum Action: String, Sendable, Encodable {
        /// Kept with its reason, not applied: the body could not be decoded (answered 400).
        case reject
        /// Kept, not applied: well-formed but carrying a value the agent does not know yet.
        case store
        /// Didomi `user.created` / `user.updated`: the user's full state for one regulation.
        case didomiUser = "didomi_user"
        /// Didomi `event.*`: partial choices, applied once confirmed.
        case didomiEvent = "didomi_event"
        /// Didomi `user.deleted`: state removed in every regulation, tombstone left.
        case didomiUserDeleted = "didomi_user_deleted"
        /// DataGuard effective permissions: the citizen's full state.
        case dataguardSnapshot = "dataguard_snapshot"
        /// DataGuard consent receipt: only what changed.
        case dataguardReceipt = "dataguard_receipt"
        /// DataGuard citizen email: kept in the outbox for a mailer; not consent state.
        case dataguardEmail = "dataguard_email"
    }

    public var endpoint: String
    public var source: String
    public var action: Action
    public var reason: String?
    public var tenant: String?
    public var user: String?
    /// Didomi event type, or the DataGuard payload kind.
    public var type: String?
    /// Idempotency key (without source/tenant/user, which the key table carries beside it).
    public var key: String?
    public var regulation: String?
    /// The delivery's own ordering key (snapshots and deletions): source time and tie-break.
    public var at: String?
    public var at2: String?
    public var tie: String?
    /// What caused the change, as recorded in the history (`didomi:user:<id>@v4`, ...).
    public var cause: String?
    public var userInfo: UserInfo?
    public var event: EventInfo?
    public var items: [Item]
    public var prefs: [Preference]
    /// For full-state deliveries: the item kinds the state replaces (absent ones are removed).
    public var replaces: [String]?
    /// A citizen email's payload (DataGuard).
    public var email: JSONValue?
    /// Request context, filled in by the HTTP layer.
    public var requestID: String?
    public var remoteAddress: String?
    public var headers: [String: String]?
    public var receivedAt: String?
    /// The credential that admitted the delivery (`oauth:<client_id>`, ...), never a secret.
    public var principal: String?

    public init(endpoint: String, source: String, action: Action) {
        self.endpoint = endpoint
        self.source = source
        self.action = action
        self.items = []
        self.prefs = []
    }

    /// A delivery that cannot be applied: kept with the reason.
    public static func rejected(endpoint: String, source: String, reason: String) -> ChangeSet {
        var change = ChangeSet(endpoint: endpoint, source: source, action: .reject)
        change.reason = reason
        return change
    }

    enum CodingKeys: String, CodingKey {
        case endpoint, source, action, reason, tenant, user, type, key, regulation, at, at2, tie, cause
        case userInfo = "user_info"
        case event, items, prefs, replaces, email
        case requestID = "request_id"
        case remoteAddress = "remote_addr"
        case headers
        case receivedAt = "received_at"
        case principal
    }

    /// User identity fields carried by the delivery.
    public struct UserInfo: Sendable, Encodable, Equatable {
        public var externalRef: String?
        public var externalRefType: String?
        public var country: String?
        public var lastSeenCountry: String?
        public var metadata: JSONValue?
        public var createdAt: String?
        public var updatedAt: String?
        public var version: Int64?

        public init() {}

        enum CodingKeys: String, CodingKey {
            case externalRef = "external_ref"
            case externalRefType = "external_ref_type"
            case country
            case lastSeenCountry = "last_seen_country"
            case metadata
            case createdAt = "created_at"
            case updatedAt = "updated_at"
            case version
        }
    }

    /// A Didomi consent event as carried by the delivery.
    public struct EventInfo: Sendable, Encodable, Equatable {
        public var id: String
        public var status: String?
        public var oldStatus: String?
        public var createdAt: String
        public var updatedAt: String?
        public var consents: JSONValue?
        public var proofsID: [String]
        public var delegate: JSONValue?

        public init(id: String, createdAt: String) {
            self.id = id
            self.createdAt = createdAt
            self.proofsID = []
        }

        enum CodingKeys: String, CodingKey {
            case id, status
            case oldStatus = "old_status"
            case createdAt = "created_at"
            case updatedAt = "updated_at"
            case consents
            case proofsID = "proofs_id"
            case delegate
        }
    }

    /// One consent row: a purpose (or vendor) under one lawful basis.
    public struct Item: Sendable, Encodable, Equatable {
        public var kind: String
        public var id: String
        public var basis: LawfulBasis
        public var status: ConsentStatus
        public var raw: String?
        public var optionType: String?
        public var validFrom: String?
        public var validUntil: String?
        /// Per-item ordering key; when absent the delivery's applies.
        public var at: String?
        public var at2: String?
        public var tie: String?
        public var cause: String?
        public var provenance: JSONValue?

        public init(kind: String, id: String, basis: LawfulBasis, status: ConsentStatus, raw: String?) {
            self.kind = kind
            self.id = id
            self.basis = basis
            self.status = status
            self.raw = raw
        }

        enum CodingKeys: String, CodingKey {
            case kind, id, basis, status, raw
            case optionType = "option_type"
            case validFrom = "valid_from"
            case validUntil = "valid_until"
            case at, at2, tie, cause, provenance
        }
    }

    /// One preference: selected value ids, sorted.
    public struct Preference: Sendable, Encodable, Equatable {
        /// Didomi: the purpose the preference hangs under; DataGuard: nil.
        public var purpose: String?
        public var pref: String
        public var values: [String]
        public var at: String?
        public var at2: String?
        public var tie: String?
        public var cause: String?
        public var provenance: JSONValue?

        public init(purpose: String?, pref: String, values: [String]) {
            self.purpose = purpose
            self.pref = pref
            self.values = values.sorted()
        }
    }
}

/// Lawful bases, as the views show them.
public enum LawfulBasis: String, Sendable, Encodable, CaseIterable {
    case consent
    case legitimateInterest = "legitimate_interest"
    case contract
    case publicInterest = "public_interest"
    case vitalInterest = "vital_interest"
    case legalObligation = "legal_obligation"
}

/// Normalized consent statuses, as the views show them.
public enum ConsentStatus: String, Sendable, Encodable, CaseIterable {
    case granted, denied, pending, claimed, objected
    case objectionUpheld = "objection_upheld"
    case unset
}
