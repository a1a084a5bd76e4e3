import Foundation

/// Decodes a Didomi webhook body (`{type, parameters}`, nested or flattened) into a change set.
///
/// Pure: no I/O. Rules (PRODUCT §4, DOMAIN §1):
/// - `user.created`/`user.updated` carry the user's full state for one regulation;
/// - `event.*` carry partial choices, applied only once confirmed (decided in SQL, which knows the
///   stored status of the event);
/// - `user.deleted` removes the user's state in every regulation;
/// - a flattened body (`parameters__entity__…`) is un-flattened and treated as lossy: it has no
///   `old_entity` and no `source`, and a list it omits (vendors) is left as stored.
public enum DidomiDecoder {
    public static let endpoint = "didomi"
    public static let source = "didomi"
    /// Event types this agent applies; others are kept as `stored` until supported.
    public static let knownTypes: Set<String> = [
        "event.created", "event.updated", "event.deleted", "user.created", "user.updated", "user.deleted",
    ]

    /// Decodes a body. A body that cannot be applied becomes a `.reject` change set with the reason.
    public static func decode(_ body: Data, receivedAt: Date) -> ChangeSet {
        do {
            return try decodeThrowing(body, receivedAt: receivedAt)
        } catch let error as PayloadError {
            return .rejected(endpoint: endpoint, source: source, reason: error.message)
        } catch {
            return .rejected(endpoint: endpoint, source: source, reason: "\(error)")
        }
    }

    static func decodeThrowing(_ body: Data, receivedAt: Date) throws -> ChangeSet {
        let document = try JSONValue.parse(body)
        guard case .object(let members) = document else {
            throw PayloadError("body must be a JSON object with 'type' and 'parameters', got \(document.typeName)")
        }
        let root = Field(document, path: "")
        let type = try root["type"].string()

        let parameters: Field
        let flattened: Bool
        if members["parameters"] != nil {
            parameters = root["parameters"]
            _ = try parameters.object()
            flattened = false
        } else if members.keys.contains(where: { $0.hasPrefix("parameters__") }) {
            parameters = Field(Flattening.unflatten(members, prefix: "parameters__"), path: "parameters")
            flattened = true
        } else {
            throw PayloadError("required field 'parameters' is missing")
        }

        guard knownTypes.contains(type) else {
            var change = ChangeSet(endpoint: endpoint, source: source, action: .store)
            change.type = type
            change.reason = "unknown Didomi event type '\(type)': kept, not applied"
            if let entity = [parameters["entity"], parameters["new_entity"]].first(where: { $0.isPresent }) {
                change.tenant = try? entity["organization_id"].identifier()
                change.user = (try? entity["user"]["id"].identifier()) ?? (try? entity["id"].identifier())
            }
            return change
        }

        let envelopeRegulation = try regulation(root["regulation"])
        switch type {
        case "user.created", "user.updated":
            return try userSnapshot(type: type, parameters: parameters, flattened: flattened,
                                    envelopeRegulation: envelopeRegulation)
        case "user.deleted":
            return try userDeleted(parameters: parameters, receivedAt: receivedAt)
        default:
            return try event(type: type, parameters: parameters, flattened: flattened,
                             envelopeRegulation: envelopeRegulation)
        }
    }

    // MARK: - Users

    private static func userSnapshot(
        type: String, parameters: Field, flattened: Bool, envelopeRegulation: String?
    ) throws -> ChangeSet {
        // user.updated carries new_entity (flattened: emitted as entity); user.created carries entity.
        let entity: Field
        if type == "user.updated", parameters["new_entity"].isPresent {
            entity = parameters["new_entity"]
        } else if parameters["entity"].isPresent {
            entity = parameters["entity"]
        } else {
            throw PayloadError("required field 'parameters.\(type == "user.updated" ? "new_entity" : "entity")' is missing")
        }
        let regulation = try regulation(entity["regulation"])
            ?? envelopeRegulation
            ?? regulation(parameters["source"]["regulation"])
            ?? "gdpr"
        return try userState(entity, type: type, regulation: regulation, flattened: flattened)
    }

    /// A user object of the Consents API (`GET /consents/users`) for one regulation, as a full state.
    public static func apiUser(_ value: JSONValue, regulation: String?) throws -> ChangeSet {
        let entity = Field(value, path: "")
        let asked = try Self.regulation(Field(regulation.map(JSONValue.string), path: "regulation"))
        let regulation = try asked ?? Self.regulation(entity["regulation"]) ?? "gdpr"
        var change = try userState(entity, type: "user.updated", regulation: regulation, flattened: false, webhook: false)
        change.endpoint = "reconciliation"
        return change
    }

    /// A regulation id as Didomi writes them (`gdpr`, `cpra`, ...): case does not make another one, and an
    /// empty value is no value (it falls through to the next source, then `gdpr`).
    static func regulation(_ field: Field) throws -> String? {
        guard let text = try field.optionalName()?.trimmingCharacters(in: .whitespaces).lowercased(), !text.isEmpty else {
            return nil
        }
        return text
    }

    /// The change set of a user's full state for one regulation.
    static func userState(_ entity: Field, type: String, regulation: String, flattened: Bool,
                          webhook: Bool = true) throws -> ChangeSet {
        _ = try entity.object()
        let tenant = try entity["organization_id"].identifier()
        let user = try entity["id"].identifier()
        let version = try entity["version"].int64()
        let updatedAt = try entity["updated_at"].timestamp()

        var change = ChangeSet(endpoint: endpoint, source: source, action: .didomiUser)
        change.type = type
        change.tenant = tenant
        change.user = user
        change.regulation = regulation
        change.key = "\(type):\(regulation):v\(version):\(updatedAt)"
        change.at = updatedAt
        change.tie = "user:" + padded(version)
        change.cause = "didomi:user:\(user)@v\(version)"
        change.userInfo = try userInfo(entity, version: version, updatedAt: updatedAt)

        // The full state replaces what is stored: a nested webhook snapshot must carry its purpose list (an
        // empty one removes every purpose; a missing one would too, so it is an error, never a wipe). A
        // flattened one has no list to carry: its purposes are the keys present. (A Consents API user
        // without a purpose list is read as having none, so that one odd user does not stop a run.)
        let consents = entity["consents"]
        if !flattened {
            if consents.isMissing { throw PayloadError("required field '\(consents.path)' is missing") }
            if webhook, case .object = consents.value, consents["purposes"].isMissing {
                throw PayloadError("required field '\(consents["purposes"].path)' is missing")
            }
        }
        let choices = try Choices(consents, snapshot: true)
        change.items = choices.items
        change.prefs = choices.prefs
        change.replaces = choices.vendorsPresent ? ["purpose", "vendor"] : ["purpose"]
        return change
    }

    private static func userDeleted(parameters: Field, receivedAt: Date) throws -> ChangeSet {
        let entity = parameters["entity"].isPresent ? parameters["entity"] : parameters["old_entity"]
        _ = try entity.object()
        let tenant = try entity["organization_id"].identifier()
        let user = try entity["id"].identifier()
        let version = try entity["version"].optionalInt64()
        let updatedAt = try entity["updated_at"].optionalTimestamp()
        let deletedAt = updatedAt ?? Timestamp.format(receivedAt)

        var change = ChangeSet(endpoint: endpoint, source: source, action: .didomiUserDeleted)
        change.type = "user.deleted"
        change.tenant = tenant
        change.user = user
        change.key = "user.deleted:v\(version.map(String.init) ?? "-"):\(updatedAt ?? "-")"
        change.at = deletedAt
        change.tie = "user:" + (version.map(padded) ?? "") + ":deleted"
        change.cause = "didomi:user.deleted:\(user)"
        var info = ChangeSet.UserInfo()
        info.version = version
        info.createdAt = try entity["created_at"].optionalTimestamp()
        info.updatedAt = updatedAt
        change.userInfo = info
        return change
    }

    private static func userInfo(_ entity: Field, version: Int64?, updatedAt: String?) throws -> ChangeSet.UserInfo {
        var info = ChangeSet.UserInfo()
        info.externalRef = try entity["organization_user_id"].optionalString()
        info.externalRefType = try entity["organization_user_id_type"].optionalString()
        info.country = try entity["country"].optionalString()
        info.lastSeenCountry = try entity["last_seen_country"].optionalString()
        info.metadata = entity["metadata"].isMissing ? nil : entity["metadata"].value
        info.createdAt = try entity["created_at"].optionalTimestamp()
        info.updatedAt = updatedAt
        info.version = version
        return info
    }

    // MARK: - Events

    private static func event(
        type: String, parameters: Field, flattened: Bool, envelopeRegulation: String?
    ) throws -> ChangeSet {
        let entity: Field
        if type == "event.updated", parameters["new_entity"].isPresent {
            entity = parameters["new_entity"]
        } else if parameters["entity"].isPresent {
            entity = parameters["entity"]
        } else {
            throw PayloadError("required field 'parameters.\(type == "event.updated" ? "new_entity" : "entity")' is missing")
        }
        _ = try entity.object()
        let id = try entity["id"].identifier()
        let tenant = try entity["organization_id"].identifier()
        let user = try entity["user"]["id"].identifier()
        let createdAt = try entity["created_at"].timestamp()
        let updatedAt = try entity["updated_at"].optionalTimestamp()
        // Events are confirmed unless they say otherwise (DOMAIN §1.5).
        let status = try entity["status"].optionalString() ?? "confirmed"
        let regulation = try regulation(entity["regulation"]) ?? envelopeRegulation ?? "gdpr"

        var old: String?
        if type == "event.updated", parameters["old_entity"].isPresent, !parameters["old_entity"].isMissing {
            _ = try parameters["old_entity"].object()
            old = try parameters["old_entity"]["status"].optionalString() ?? "confirmed"
        }

        var change = ChangeSet(endpoint: endpoint, source: source, action: .didomiEvent)
        change.type = type
        change.tenant = tenant
        change.user = user
        change.regulation = regulation
        switch type {
        case "event.updated":
            // Without updated_at, the prior status tells a confirmation from a later update of the
            // confirmed event (a proof attached); either may arrive first, so they must not share a key.
            change.key = updatedAt.map { "event.updated:\(id):\($0):\(status)" }
                ?? "event.updated:\(id):-:\(old ?? "-")>\(status)"
        default:
            change.key = "\(type):\(id)"
        }
        change.cause = "didomi:event:\(id)"

        var info = ChangeSet.EventInfo(id: id, createdAt: createdAt)
        info.status = status
        info.oldStatus = old
        info.updatedAt = updatedAt
        info.consents = entity["consents"].value
        info.proofsID = try entity["proofs_id"].stringArray()
        info.delegate = entity["delegate"].isMissing ? nil : entity["delegate"].value
        change.event = info

        var userInfo = ChangeSet.UserInfo()
        userInfo.externalRef = try entity["user"]["organization_user_id"].optionalString()
        userInfo.country = try entity["user"]["country"].optionalString()
        userInfo.lastSeenCountry = try entity["user"]["last_seen_country"].optionalString()
        change.userInfo = userInfo

        let consents = entity["consents"]
        if consents.isMissing && !flattened && type != "event.deleted" {
            throw PayloadError("required field '\(consents.path)' is missing")
        }
        let choices = try Choices(consents, snapshot: false)
        change.items = choices.items
        change.prefs = choices.prefs
        return change
    }

    /// Zero-padded decimal, so that versions order correctly as text tie-breaks.
    static func padded(_ value: Int64) -> String {
        let digits = String(value)
        return String(repeating: "0", count: max(0, 20 - digits.count)) + digits
    }
}

/// The purposes, preferences and vendors of a Didomi `consents` object.
struct Choices {
    var items: [ChangeSet.Item] = []
    var prefs: [ChangeSet.Preference] = []
    var vendorsPresent = false

    /// - Parameter snapshot: a user's full state (every listed purpose gets a row, null = `unset`)
    ///   rather than an event's partial choices (only explicit true/false choices count).
    init(_ consents: Field, snapshot: Bool) throws {
        guard !consents.isMissing else { return }
        _ = try consents.object()
        for purpose in try purposes(consents["purposes"]) {
            let field = purpose.field
            let id = try purpose.id ?? field["id"].identifier()
            let enabled = try field["enabled"].optionalBool()
            if snapshot || enabled != nil {
                items.append(.init(kind: "purpose", id: id, basis: .consent,
                                   status: enabled.map { $0 ? .granted : .denied } ?? .unset,
                                   raw: enabled.map { String($0) } ?? "null"))
            }
            if field["enabled_li"].isPresent {
                let li = try field["enabled_li"].optionalBool()
                if snapshot || li != nil {
                    items.append(.init(kind: "purpose", id: id, basis: .legitimateInterest,
                                       status: li.map { $0 ? .claimed : .objected } ?? .unset,
                                       raw: li.map { String($0) } ?? "null"))
                }
            }
            if let values = try field["values"].optionalObject() {
                for key in values.keys.sorted() {
                    let preference = try field["values"].storableKey(key)
                    let valueField = field["values"][preference]
                    let text: String?
                    if case .string? = valueField.value {
                        text = try valueField.optionalName()  // tolerate a bare string in place of {value: ...}
                    } else {
                        text = try valueField["value"].optionalName()
                    }
                    var seen = Set<String>()  // a selection is a set: a value named twice counts once
                    let ids = (text ?? "").split(separator: ",")
                        .map { $0.trimmingCharacters(in: .whitespaces) }
                        .filter { !$0.isEmpty && seen.insert($0).inserted }
                    prefs.append(.init(purpose: id, pref: preference, values: ids))
                }
            }
        }

        let vendors = consents["vendors"]
        if !vendors.isMissing {
            _ = try vendors.object()
            vendorsPresent = true
            let lists: [(String, LawfulBasis, ConsentStatus)] = [
                ("enabled", .consent, .granted), ("disabled", .consent, .denied),
                ("enabled_li", .legitimateInterest, .claimed), ("disabled_li", .legitimateInterest, .objected),
            ]
            for (name, basis, status) in lists {
                for vendor in try vendors[name].stringArray() {
                    items.append(.init(kind: "vendor", id: vendor, basis: basis, status: status, raw: name))
                }
            }
        }
    }

    /// Purposes as an array of objects (nested form) or an object keyed by purpose id (flattened form).
    private func purposes(_ field: Field) throws -> [(id: String?, field: Field)] {
        switch field.value {
        case nil, .null?:
            return []
        case .array(let elements)?:
            return elements.indices.map { (nil, Field(elements[$0], path: "\(field.path)[\($0)]")) }
        case .object(let members)?:
            return try members.keys.sorted().map { (Optional(try field.storableKey($0)), field[$0]) }
        case let other?:
            throw PayloadError("field '\(field.path)' must be an array, got \(other.typeName)")
        }
    }
}

/// Didomi's "flatten request body" option: keys are property paths joined with `__`, arrays of
/// objects keyed by the element's id. Un-flattening rebuilds objects; such arrays come back as
/// objects keyed by id, which the readers above accept.
enum Flattening {
    static func unflatten(_ members: [String: JSONValue], prefix: String) -> JSONValue {
        var root: [String: JSONValue] = [:]
        for key in members.keys.sorted() where key.hasPrefix(prefix) {
            let path = key.dropFirst(prefix.count).components(separatedBy: "__")
            guard !path.isEmpty, !path.contains(where: \.isEmpty) else { continue }
            insert(members[key]!, at: path[...], into: &root)
        }
        return .object(root)
    }

    private static func insert(_ value: JSONValue, at path: ArraySlice<String>, into object: inout [String: JSONValue]) {
        let head = path.first!
        if path.count == 1 {
            object[head] = value
            return
        }
        var child: [String: JSONValue]
        if case .object(let existing)? = object[head] { child = existing } else { child = [:] }
        insert(value, at: path.dropFirst(), into: &child)
        object[head] = .object(child)
    }
}
