import Configuration
import ConsentCore
import ConsentReconcile
import ConsentStore
import Foundation
import SystemPackage

/// The agent's settings. Read from one JSON file plus the environment (`CONSENT_SYNC_` + the key in
/// upper case with `.` → `_`; `DATABASE_URL` overrides `database.url`). Keys are documented in
/// `config/consent-sync.example.json`.
public struct AgentConfiguration: Sendable {
    /// A value that cannot be used: the message names the key.
    public struct Invalid: Error, CustomStringConvertible {
        public var description: String
    }

    public var host = "127.0.0.1"
    public var port = 8080
    /// PostgreSQL URL; nil = the embedded cluster under `stateDirectory`.
    public var databaseURL: String?
    /// The database password when it is kept apart from the URL (`database.password`, a file, or the
    /// `database-password` credential); it replaces any password in the URL.
    public var databasePassword: String?
    public var migrationsDirectory: String?
    public var migrateOnStart = true
    public var databaseMaxConnections = 20
    public var applyTimeout: Duration = .milliseconds(500)
    /// How long a request then waits for the answer to its statements before it is answered 503.
    public var answerTimeout: Duration = ConsentStore.answerDeadline
    public var stateDirectory: String
    public var embeddedPort = 54329
    public var authDisabled: Bool {
        get { auth.disabled }
        set { auth.disabled = newValue }
    }
    public var auth = AuthSettings()
    public var maxBodyBytes = 1 << 20
    /// A connection with nothing read or written for this long is closed (keep-alive between
    /// deliveries, or a client that stopped sending mid-request).
    public var idleTimeoutSeconds = 60
    /// Group commit (`ingest.*`): the ingestor's own settings and defaults.
    public var ingest = Ingestor.Configuration()
    public var logLevel = "info"
    public var retention = RetentionService.Settings()
    public var reconcile = ReconcileSettings()
    /// `CONSENT_SYNC_*` environment variables that name no key (logged as warnings by `serve`).
    public var unknownEnvironmentKeys: [String] = []

    public struct ReconcileSettings: Sendable {
        public var maxRemovalShare = 0.05
        public var didomi: DidomiAPISource.Settings?
        public var dataguard: DataGuardAPISource.Settings?
    }

    public init(stateDirectory: String = AgentConfiguration.defaultStateDirectory) {
        self.stateDirectory = stateDirectory
    }

    /// `$STATE_DIRECTORY` (systemd), else /var/lib/consent-sync as root, else ~/.local/state/consent-sync.
    public static var defaultStateDirectory: String {
        let env = ProcessInfo.processInfo.environment
        if let state = env["STATE_DIRECTORY"], !state.isEmpty {
            return String(state.split(separator: ":").first ?? "")
        }
        if getuid() == 0 { return "/var/lib/consent-sync" }
        let home = env["XDG_STATE_HOME"] ?? ((env["HOME"] ?? "/tmp") + "/.local/state")
        return home + "/consent-sync"
    }

    public static let defaultFile = "/etc/consent-sync/config.json"

    /// Reads the file (if it exists, or fails if it was named explicitly and is missing) and the environment.
    public static func load(
        file: String?, environment: [String: String] = ProcessInfo.processInfo.environment
    ) async throws -> AgentConfiguration {
        var providers: [any ConfigProvider] = [
            EnvironmentVariablesProvider(
                environmentVariables: environment,
                secretsSpecifier: .dynamic { key, _ in key.contains("PASSWORD") || key.contains("SECRET") || key.contains("URL") }
            ).prefixKeys(with: ["consent", "sync"])
        ]
        let named = file ?? environment["CONSENT_SYNC_CONFIG"].flatMap { $0.isEmpty ? nil : $0 }
        let path = named ?? defaultFile
        // A file that is there but cannot be read (say, a directory the service user may not enter)
        // must not be taken for an absent one: the agent would start on defaults without a word.
        var status = stat()
        let found = stat(path, &status) == 0
        if !found && errno != ENOENT && errno != ENOTDIR || found && access(path, R_OK) != 0 {
            throw Invalid(description: "configuration file \(path) cannot be read: \(String(cString: strerror(errno)))" +
                          " (the user running consent-sync needs read access to it and its directory)")
        }
        if found {
            do {
                providers.append(try await FileProvider<JSONSnapshot>(filePath: FilePath(path)))
            } catch {
                throw Invalid(description: "configuration file \(path) cannot be read: \(error)")
            }
            // A misspelt key would otherwise be ignored silently and its default used.
            if let data = FileManager.default.contents(atPath: path),
               let object = try? JSONSerialization.jsonObject(with: data) as? [String: Any],
               let unknown = fileKeys(object).first(where: { !knownKeys.contains($0) }) {
                throw Invalid(description: "configuration file \(path): unknown key '\(unknown)'" +
                              (suggestion(for: unknown).map { " (did you mean '\($0)'?)" } ?? ""))
            }
        } else if named != nil {
            throw Invalid(description: "configuration file \(path) does not exist" +
                          (file == nil ? " (named by CONSENT_SYNC_CONFIG)" : ""))
        }
        var configuration = try AgentConfiguration(reader: ConfigReader(providers: providers), environment: environment)
        configuration.unknownEnvironmentKeys = environment.keys
            .filter { $0.hasPrefix("CONSENT_SYNC_") && !environmentNames.contains($0) }
            .sorted()
        return configuration
    }

    /// Every key the configuration reads (see `config/consent-sync.example.json` and the README).
    public static let knownKeys: Set<String> = {
        var keys: Set<String> = [
            "http.host", "http.port", "http.idle_timeout_seconds",
            "database.url", "database.password", "database.password_file", "database.migrations_dir",
            "database.migrate_on_start", "database.max_connections", "database.apply_timeout_ms", "database.answer_timeout_ms",
            "state_directory", "embedded.port", "log.level", "webhooks.max_body_bytes",
            "ingest.max_batch", "ingest.workers", "ingest.queue_capacity",
            "retention.deliveries_days", "retention.history_days",
            "auth.disabled", "auth.oauth.token_lifetime_seconds", "auth.oauth.cache_seconds",
            "auth.jwt.jwks_url", "auth.jwt.issuer", "auth.jwt.audience", "auth.jwt.leeway_seconds",
            "auth.dataguard.key_name", "auth.dataguard.key_location",
            "network.didomi.allow", "network.dataguard.allow", "network.trusted_proxies",
            "reconcile.max_removal_share",
            "reconcile.didomi.organization_id", "reconcile.didomi.base_url", "reconcile.didomi.regulations",
            "reconcile.dataguard.application_id", "reconcile.dataguard.base_url", "reconcile.dataguard.path",
        ]
        var secrets = ["auth.dataguard.api_keys", "auth.dataguard.bearer_tokens",
                       "reconcile.didomi.api_key", "reconcile.didomi.api_secret", "reconcile.dataguard.api_key"]
        for kind in DataGuardDecoder.Kind.allCases {
            let scope = configurationScope(kind)
            secrets += ["auth.dataguard.\(scope).api_keys", "auth.dataguard.\(scope).bearer_tokens"]
            keys.insert("network.dataguard.\(scope).allow")
        }
        for key in secrets { keys.insert(key); keys.insert(key + "_file") }
        return keys
    }()

    /// Environment variables of the `CONSENT_SYNC_` family that are not configuration keys.
    static let otherEnvironmentNames: Set<String> = [
        "CONSENT_SYNC_CONFIG", "CONSENT_SYNC_POSTGRES_BIN", "CONSENT_SYNC_RECONCILE_SOURCE",
    ]

    static let environmentNames: Set<String> = otherEnvironmentNames.union(knownKeys.map(environmentName))

    /// What `http.host` and `serve --host` accept: an IPv4 or IPv6 address (brackets allowed), or a host
    /// name as RFC 1123 spells one (labels of letters, digits and inner hyphens, 63 characters at most,
    /// 253 in all). Anything else would only fail later, at bind, without naming the key.
    public static func isHost(_ host: String) -> Bool {
        var text = Substring(host)
        if text.hasPrefix("["), text.hasSuffix("]") { text = text.dropFirst().dropLast() }
        if text.contains(":") {  // IPv6: hex groups, at most one '::', an optional IPv4 tail and %zone
            let address = text.split(separator: "%", maxSplits: 1, omittingEmptySubsequences: false)[0]
            let allowed = Set("0123456789abcdefABCDEF:.")
            return !address.isEmpty && address.allSatisfy(allowed.contains)
                && address.components(separatedBy: "::").count <= 2 && address.split(separator: ":").count <= 8
        }
        guard !text.isEmpty, text.utf8.count <= 253 else { return false }
        let labels = (text.hasSuffix(".") ? text.dropLast() : text).split(separator: ".", omittingEmptySubsequences: false)
        return labels.allSatisfy { label in
            !label.isEmpty && label.utf8.count <= 63 && label.first != "-" && label.last != "-"
                && label.unicodeScalars.allSatisfy { $0.isASCII && ($0.properties.isAlphabetic || ("0"..."9").contains($0) || $0 == "-") }
        }
    }

    /// What `http.port` and `serve --port` accept (0: any free port).
    public static let ports = 0...65535

    /// A list given as one text (an environment variable): comma-separated, or a JSON array of strings
    /// as the configuration file writes it.
    static func listItems(_ text: String) -> [String] {
        jsonArray(text) ?? text.split(separator: ",").map(String.init)
    }

    /// Items that together are a JSON array text (the environment provider splits any text on its
    /// commas) are that array.
    static func listItems(_ items: [String]) -> [String] {
        if let first = items.first, first.trimmingCharacters(in: .whitespaces).hasPrefix("["),
           let array = jsonArray(items.joined(separator: ",")) {
            return array
        }
        return items
    }

    private static func jsonArray(_ text: String) -> [String]? {
        let trimmed = text.trimmingCharacters(in: .whitespaces)
        guard trimmed.hasPrefix("[") else { return nil }
        return try? JSONDecoder().decode([String].self, from: Data(trimmed.utf8))
    }

    /// A DataGuard endpoint's part of its keys: `consent-receipts` → `consent_receipts`.
    static func configurationScope(_ kind: DataGuardDecoder.Kind) -> String {
        kind.rawValue.replacingOccurrences(of: "-", with: "_")
    }

    /// `auth.disabled` → `CONSENT_SYNC_AUTH_DISABLED`.
    static func environmentName(_ key: String) -> String {
        "CONSENT_SYNC_" + key.uppercased().replacingOccurrences(of: ".", with: "_")
    }

    /// A leaf of the file is a known key, or a nested object (`{"http": {"port": 1}}`) or dotted name
    /// (`{"http.port": 1}`) leading to one.
    static func fileKeys(_ object: [String: Any], prefix: String = "") -> [String] {
        object.keys.sorted().flatMap { name -> [String] in
            let key = prefix.isEmpty ? name : prefix + "." + name
            if let nested = object[name] as? [String: Any], !knownKeys.contains(key) {
                return fileKeys(nested, prefix: key)
            }
            return [key]
        }
    }

    /// The known key closest to a misspelt one (a few edits away), if any.
    static func suggestion(for key: String) -> String? {
        func distance(_ a: [Character], _ b: [Character]) -> Int {
            var previous = Array(0...b.count)
            for (i, x) in a.enumerated() {
                var current = [i + 1]
                for (j, y) in b.enumerated() {
                    current.append(min(previous[j + 1] + 1, current[j] + 1, previous[j] + (x == y ? 0 : 1)))
                }
                previous = current
            }
            return previous[b.count]
        }
        let letters = Array(key)
        let best = knownKeys.map { ($0, distance(letters, Array($0))) }.min { ($0.1, $0.0) < ($1.1, $1.0) }
        guard let best, best.1 <= max(2, key.count / 5) else { return nil }
        return best.0
    }

    init(reader: ConfigReader, environment: [String: String]) throws {
        self.init()
        func int(_ key: String, _ fallback: Int, range: ClosedRange<Int>) throws -> Int {
            if let value = reader.int(forKey: ConfigKey(key)) {
                guard range.contains(value) else {
                    throw Invalid(description: "configuration key '\(key)' must be an integer in \(range), got \(value)")
                }
                return value
            }
            guard let text = reader.string(forKey: ConfigKey(key)) else { return fallback }
            guard let value = Int(text), range.contains(value) else {
                throw Invalid(description: "configuration key '\(key)' must be an integer in \(range), got '\(text)'")
            }
            return value
        }
        func bool(_ key: String, _ fallback: Bool) throws -> Bool {
            if let value = reader.bool(forKey: ConfigKey(key)) { return value }
            guard let text = reader.string(forKey: ConfigKey(key)) else { return fallback }
            switch text.lowercased() {
            case "true", "1", "yes", "on": return true
            case "false", "0", "no", "off": return false
            default: throw Invalid(description: "configuration key '\(key)' must be true or false, got '\(text)'")
            }
        }
        host = reader.string(forKey: "http.host") ?? host
        guard Self.isHost(host) else {
            throw Invalid(description: "configuration key 'http.host' must be an IP address or a host name (letters, digits, hyphens and dots), got '\(host)'")
        }
        port = try int("http.port", port, range: Self.ports)
        databaseURL = environment["DATABASE_URL"].flatMap { $0.isEmpty ? nil : $0 }
            ?? reader.string(forKey: "database.url", isSecret: true)
        migrationsDirectory = reader.string(forKey: "database.migrations_dir")
        migrateOnStart = try bool("database.migrate_on_start", migrateOnStart)
        databaseMaxConnections = try int("database.max_connections", databaseMaxConnections, range: 1...1000)
        applyTimeout = .milliseconds(try int("database.apply_timeout_ms", 500, range: 10...600_000))
        answerTimeout = .milliseconds(try int("database.answer_timeout_ms", 5000, range: 100...600_000))
        stateDirectory = reader.string(forKey: "state_directory") ?? stateDirectory
        embeddedPort = try int("embedded.port", embeddedPort, range: 1...65535)
        auth.disabled = try bool("auth.disabled", false)
        auth.tokenLifetime = try int("auth.oauth.token_lifetime_seconds", auth.tokenLifetime, range: 1...86_400)
        auth.tokenCacheSeconds = try int("auth.oauth.cache_seconds", auth.tokenCacheSeconds, range: 0...300)
        if let jwks = reader.string(forKey: "auth.jwt.jwks_url") {
            guard URL(string: jwks)?.scheme.map({ ["http", "https"].contains($0) }) == true else {
                throw Invalid(description: "configuration key 'auth.jwt.jwks_url' must be an http(s) URL")
            }
            auth.jwt = .init(jwksURL: jwks, issuer: reader.string(forKey: "auth.jwt.issuer"),
                             audience: reader.string(forKey: "auth.jwt.audience"),
                             leewaySeconds: try int("auth.jwt.leeway_seconds", 60, range: 0...3600))
        }
        // systemd credentials: `LoadCredential=NAME:FILE` gives NAME; the units load the whole
        // /etc/consent-sync/credentials directory (`LoadCredential=consent-sync:DIR`), which gives
        // consent-sync_NAME for each file present (absent files are fine that way).
        let credentialsDirectory = environment["CREDENTIALS_DIRECTORY"]
        func credentialFile(_ name: String) -> String? {
            guard let credentialsDirectory else { return nil }
            return ["\(credentialsDirectory)/\(name)", "\(credentialsDirectory)/consent-sync_\(name)"]
                .first { FileManager.default.fileExists(atPath: $0) }
        }
        func secrets(_ key: String, credential: String) throws -> [String] {
            var values = reader.stringArray(forKey: ConfigKey(key), isSecret: true).map(Self.listItems)
                ?? reader.string(forKey: ConfigKey(key), isSecret: true).map(Self.listItems)
                ?? []
            var files: [String] = []
            if let file = reader.string(forKey: ConfigKey(key + "_file")) { files.append(file) }
            if let file = credentialFile(credential) { files.append(file) }
            for file in files {
                guard let text = try? String(contentsOfFile: file, encoding: .utf8) else {
                    throw Invalid(description: "configuration key '\(key)_file': cannot read \(file)")
                }
                values += text.split(whereSeparator: \.isNewline).map(String.init)
            }
            return values.map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty }
        }
        func networks(_ key: String) throws -> [IPNetwork] {
            let values = reader.stringArray(forKey: ConfigKey(key)).map(Self.listItems)
                ?? reader.string(forKey: ConfigKey(key)).map(Self.listItems) ?? []
            return try values.filter { !$0.trimmingCharacters(in: .whitespaces).isEmpty }.map {
                guard let network = IPNetwork($0) else {
                    throw Invalid(description: "configuration key '\(key)': '\($0)' is not an IP address or CIDR network")
                }
                return network
            }
        }
        auth.didomiAllow = try networks("network.didomi.allow")
        let sharedAllow = try networks("network.dataguard.allow")
        auth.trustedProxies = try networks("network.trusted_proxies")
        let sharedKeys = try secrets("auth.dataguard.api_keys", credential: "dataguard-api-keys")
        let sharedTokens = try secrets("auth.dataguard.bearer_tokens", credential: "dataguard-bearer-tokens")
        let keyName = reader.string(forKey: "auth.dataguard.key_name") ?? "X-API-Key"
        guard !keyName.isEmpty, keyName.allSatisfy({ $0.isLetter || $0.isNumber || $0 == "-" || $0 == "_" }) else {
            throw Invalid(description: "configuration key 'auth.dataguard.key_name' must be a header/parameter name")
        }
        let locationText = reader.string(forKey: "auth.dataguard.key_location") ?? "both"
        guard let location = AuthSettings.DataGuardCredentials.Location(rawValue: locationText) else {
            throw Invalid(description: "configuration key 'auth.dataguard.key_location' must be header, query or both")
        }
        for kind in DataGuardDecoder.Kind.allCases {
            let scope = Self.configurationScope(kind)
            var credentials = AuthSettings.DataGuardCredentials()
            credentials.keyName = keyName
            credentials.keyLocation = location
            let ownKeys = try secrets("auth.dataguard.\(scope).api_keys", credential: "dataguard-\(kind.rawValue)-api-keys")
            let ownTokens = try secrets("auth.dataguard.\(scope).bearer_tokens", credential: "dataguard-\(kind.rawValue)-bearer-tokens")
            // An endpoint with credentials of its own (keys or bearer tokens) takes those only: the
            // shared ones of either kind no longer open it.
            let own = !ownKeys.isEmpty || !ownTokens.isEmpty
            credentials.apiKeys = own ? ownKeys : sharedKeys
            credentials.bearerTokens = own ? ownTokens : sharedTokens
            let ownAllow = try networks("network.dataguard.\(scope).allow")
            credentials.allow = ownAllow.isEmpty ? sharedAllow : ownAllow
            auth.dataguard[kind] = credentials
        }
        maxBodyBytes = try int("webhooks.max_body_bytes", maxBodyBytes, range: 1024...(64 << 20))
        idleTimeoutSeconds = try int("http.idle_timeout_seconds", idleTimeoutSeconds, range: 1...3600)
        ingest.maxBatch = try int("ingest.max_batch", ingest.maxBatch, range: 1...10_000)
        ingest.workers = try int("ingest.workers", ingest.workers, range: 1...64)
        ingest.queueCapacity = try int("ingest.queue_capacity", ingest.queueCapacity, range: 1...1_000_000)
        logLevel = reader.string(forKey: "log.level") ?? logLevel
        if let text = reader.string(forKey: "reconcile.max_removal_share") ?? reader.double(forKey: "reconcile.max_removal_share").map({ String($0) }) {
            guard let share = Double(text), (0...1).contains(share) else {
                throw Invalid(description: "configuration key 'reconcile.max_removal_share' must be a number between 0 and 1")
            }
            reconcile.maxRemovalShare = share
        }
        func secret(_ key: String, credential: String) throws -> String? {
            try secrets(key, credential: credential).first
        }
        // A password is taken whole (commas and spaces included): only a file's line break is dropped.
        if let password = reader.string(forKey: "database.password", isSecret: true) {
            databasePassword = password
        } else if let file = reader.string(forKey: "database.password_file") ?? credentialFile("database-password") {
            guard let text = try? String(contentsOfFile: file, encoding: .utf8) else {
                throw Invalid(description: "configuration key 'database.password_file': cannot read \(file)")
            }
            let line = text.split(separator: "\n", maxSplits: 1, omittingEmptySubsequences: false).first ?? ""
            let password = line.hasSuffix("\r") ? String(line.dropLast()) : String(line)
            databasePassword = password.isEmpty ? nil : password
        }
        /// An API base URL: http or https, with a host.
        func baseURL(_ key: String) throws -> String? {
            guard let text = reader.string(forKey: ConfigKey(key)) else { return nil }
            guard let url = URLComponents(string: text), let scheme = url.scheme?.lowercased(), ["http", "https"].contains(scheme),
                  let host = url.host, !host.isEmpty else {
                throw Invalid(description: "configuration key '\(key)' must be an http or https URL with a host, not '\(text.prefix(80))'")
            }
            return text
        }
        if let organization = reader.string(forKey: "reconcile.didomi.organization_id") {
            guard let key = try secret("reconcile.didomi.api_key", credential: "didomi-api-key"),
                  let apiSecret = try secret("reconcile.didomi.api_secret", credential: "didomi-api-secret") else {
                throw Invalid(description: "configuration key 'reconcile.didomi.api_key' and 'reconcile.didomi.api_secret' are required with reconcile.didomi.organization_id")
            }
            var settings = DidomiAPISource.Settings(organizationID: organization, apiKey: key, apiSecret: apiSecret)
            settings.baseURL = try baseURL("reconcile.didomi.base_url") ?? settings.baseURL
            let regulations = reader.stringArray(forKey: "reconcile.didomi.regulations").map(Self.listItems)
                ?? reader.string(forKey: "reconcile.didomi.regulations").map(Self.listItems)
            // Spelt as the webhooks store them: lower case, no blanks ("gdpr, cpra" is two).
            let spelt = regulations?.map { $0.trimmingCharacters(in: .whitespaces).lowercased() }.filter { !$0.isEmpty }
            if let bad = spelt?.first(where: { !$0.allSatisfy { $0.isASCII && ($0.isLetter || $0.isNumber || $0 == "_" || $0 == "-") } }) {
                throw Invalid(description: "configuration key 'reconcile.didomi.regulations' must list regulation names separated by commas (e.g. gdpr,cpra), not '\(bad.prefix(40))'")
            }
            if let spelt, !spelt.isEmpty { settings.regulations = spelt }
            reconcile.didomi = settings
        }
        if let application = reader.string(forKey: "reconcile.dataguard.application_id") {
            guard let key = try secret("reconcile.dataguard.api_key", credential: "dataguard-store-api-key") else {
                throw Invalid(description: "configuration key 'reconcile.dataguard.api_key' is required with reconcile.dataguard.application_id")
            }
            var settings = DataGuardAPISource.Settings(applicationID: application, apiKey: key)
            settings.baseURL = try baseURL("reconcile.dataguard.base_url") ?? settings.baseURL
            settings.path = reader.string(forKey: "reconcile.dataguard.path") ?? settings.path
            reconcile.dataguard = settings
        }
        retention.deliveriesDays = try int("retention.deliveries_days", retention.deliveriesDays, range: 1...3650)
        if reader.string(forKey: "retention.history_days") != nil || reader.int(forKey: "retention.history_days") != nil {
            retention.historyDays = try int("retention.history_days", 0, range: 1...36500)
        }
        guard ["trace", "debug", "info", "notice", "warning", "error", "critical"].contains(logLevel) else {
            throw Invalid(description: "configuration key 'log.level' must be one of trace, debug, info, notice, warning, error, critical")
        }
        if let databaseURL {
            do { _ = try DatabaseURL.configuration(databaseURL) } catch {
                throw Invalid(description: "configuration key 'database.url' (or DATABASE_URL): \(error)")
            }
        }
    }
}
