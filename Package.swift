// swift-tools-version: 6.1
import PackageDescription

let package = Package(
    name: "consent-sync",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "consent-sync", targets: ["consent-sync"])
    ],
    dependencies: [
        .package(url: "https://github.com/hummingbird-project/hummingbird.git", from: "2.28.1"),
        .package(url: "https://github.com/apple/swift-http-types.git", from: "1.8.0"),
        .package(url: "https://github.com/vapor/postgres-nio.git", from: "1.33.2"),
        .package(url: "https://github.com/apple/swift-nio-ssl.git", from: "2.37.6"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle.git", from: "2.13.0"),
        .package(url: "https://github.com/apple/swift-argument-parser.git", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-log.git", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-metrics.git", from: "2.13.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus.git", from: "2.4.1"),
        .package(url: "https://github.com/apple/swift-crypto.git", "3.12.3"..<"5.0.0"),
        .package(url: "https://github.com/apple/swift-configuration.git", from: "1.4.0"),
        .package(url: "https://github.com/apple/swift-system.git", from: "1.8.1"),
        .package(url: "https://github.com/apple/swift-atomics.git", from: "1.3.0"),
        .package(url: "https://github.com/vapor/jwt-kit.git", from: "5.8.0"),
        .package(url: "https://github.com/swift-server/async-http-client.git", from: "1.37.0"),
    ],
    targets: [
        // Pure: payload decoding and the normalized change model. No I/O.
        .target(
            name: "ConsentCore",
            dependencies: [
                .product(name: "Crypto", package: "swift-crypto")
            ]
        ),
        // PostgreSQL: migrations, the batched apply path, the embedded cluster.
        .target(
            name: "ConsentStore",
            dependencies: [
                "ConsentCore",
                .product(name: "PostgresNIO", package: "postgres-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "Atomics", package: "swift-atomics"),
                .product(name: "CryptoExtras", package: "swift-crypto"),
            ]
        ),
        // HTTP: admission, routes, responses.
        .target(
            name: "ConsentServer",
            dependencies: [
                "ConsentCore",
                "ConsentStore",
                "ConsentReconcile",
                .product(name: "Hummingbird", package: "hummingbird"),
                .product(name: "HTTPTypes", package: "swift-http-types"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "Prometheus", package: "swift-prometheus"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "Configuration", package: "swift-configuration"),
                .product(name: "SystemPackage", package: "swift-system"),
                .product(name: "JWTKit", package: "jwt-kit"),
                .product(name: "AsyncHTTPClient", package: "async-http-client"),
                .product(name: "CryptoExtras", package: "swift-crypto"),
            ]
        ),
        // Reconciliation: snapshot sources (API, file) → staging (COPY) → set-based diff → repair.
        .target(
            name: "ConsentReconcile",
            dependencies: [
                "ConsentCore",
                "ConsentStore",
                .product(name: "PostgresNIO", package: "postgres-nio"),
                .product(name: "AsyncHTTPClient", package: "async-http-client"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .executableTarget(
            name: "consent-sync",
            dependencies: [
                "ConsentCore",
                "ConsentServer",
                "ConsentStore",
                "ConsentReconcile",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "Prometheus", package: "swift-prometheus"),
            ],
            // The agent idles with the code it touched at start resident. Linked by lld (shipped with the
            // toolchain) instead of gold, read-only data sits apart from code; without exporting every
            // Swift symbol to the dynamic table, the loader reads no 4 MB symbol table. Both cut the idle
            // resident set by about 6 MB and change nothing else (symbol names in crash reports come from
            // the binary's own symbol table, which stays).
            linkerSettings: [
                .unsafeFlags(["-use-ld=lld", "-Xlinker", "--no-export-dynamic"], .when(platforms: [.linux]))
            ]
        ),
        .testTarget(
            name: "ConsentCoreTests",
            dependencies: ["ConsentCore"]
        ),
        .testTarget(
            name: "ConsentSyncTests",
            dependencies: [
                "ConsentCore",
                "ConsentStore",
                "ConsentServer",
                "ConsentReconcile",
                .product(name: "HummingbirdTesting", package: "hummingbird"),
                .product(name: "JWTKit", package: "jwt-kit"),
                .product(name: "AsyncHTTPClient", package: "async-http-client"),
                .product(name: "PostgresNIO", package: "postgres-nio"),
            ]
        ),
    ],
    swiftLanguageModes: [.v6]
)
