// swift-tools-version:6.0
import PackageDescription

// Dependencies run one way:
//   TensorCore ← LanguageModel ← Editing ← Evaluation ← Pipeline ← dafnet
//   Storage needs only TensorCore; Tokenizers needs nothing; Distributed (MPI) serves the trainers
//   in LanguageModel and Editing.
// Only the `dafnet` executable imports ArgumentParser.
let optimize: [SwiftSetting] = [.unsafeFlags(["-Ounchecked", "-wmo"], .when(configuration: .release))]

let package = Package(
    name: "dafnet",
    platforms: [.macOS(.v14)],
    products: [
        .library(name: "DAFNetKit", targets: ["TensorCore", "Tokenizers", "Storage", "Distributed", "LanguageModel", "World", "Editing", "Evaluation", "Pipeline"]),
        .executable(name: "dafnet", targets: ["dafnet"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-crypto", from: "3.12.3"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
    ],
    targets: [
        // System libraries (Debian: libopenblas-dev, libzstd-dev, libarchive-dev), found through pkg-config.
        .systemLibrary(name: "COpenBLAS", pkgConfig: "openblas",
                       providers: [.apt(["libopenblas-dev"])]),
        .systemLibrary(name: "CZstd", pkgConfig: "libzstd", providers: [.apt(["libzstd-dev"])]),
        .systemLibrary(name: "CArchive", pkgConfig: "libarchive", providers: [.apt(["libarchive-dev"])]),
        // Open MPI (Debian: libopenmpi-dev, openmpi-bin), for the trainers' data parallelism only.
        .systemLibrary(name: "CMPI", pkgConfig: "ompi-c", providers: [.apt(["libopenmpi-dev"])]),

        .target(name: "TensorCore", dependencies: ["COpenBLAS"], swiftSettings: optimize),
        .target(name: "Tokenizers", swiftSettings: optimize),
        .target(name: "Distributed", dependencies: ["CMPI", "TensorCore"], swiftSettings: optimize),
        .target(name: "Storage",
                dependencies: ["TensorCore", "CZstd", "CArchive", .product(name: "Crypto", package: "swift-crypto")],
                swiftSettings: optimize),
        .target(name: "World", dependencies: ["TensorCore"], swiftSettings: optimize),
        .target(name: "LanguageModel", dependencies: ["TensorCore", "Tokenizers", "Storage", "Distributed"],
                swiftSettings: optimize),
        .target(name: "Editing", dependencies: ["LanguageModel", "Storage", "World", "Distributed"], swiftSettings: optimize),
        .target(name: "Evaluation", dependencies: ["LanguageModel", "World", "Editing"], swiftSettings: optimize),
        .target(name: "Pipeline", dependencies: ["Editing", "Evaluation", "Storage", "LanguageModel", .product(name: "Logging", package: "swift-log")], swiftSettings: optimize),
        .executableTarget(
            name: "dafnet",
            dependencies: ["TensorCore", "Tokenizers", "Storage", "Distributed", "LanguageModel", "World", "Editing", "Evaluation", "Pipeline",
                           .product(name: "ArgumentParser", package: "swift-argument-parser"),
                           .product(name: "Logging", package: "swift-log")],
            swiftSettings: optimize),
        // The parsers' fuzz harnesses (scripts/fuzz.sh builds them under libFuzzer; normally a corpus replayer).
        .executableTarget(name: "dafnet-fuzz", dependencies: ["TensorCore", "Tokenizers", "Storage", "Editing"]),

        .testTarget(name: "TensorCoreTests", dependencies: ["TensorCore"]),
        .testTarget(name: "TokenizersTests", dependencies: ["Tokenizers"], resources: [.copy("Fixtures")]),
        .testTarget(name: "StorageTests", dependencies: ["Storage"]),
        .testTarget(name: "DistributedTests", dependencies: ["Distributed", "TensorCore", "Storage"]),
        .testTarget(name: "WorldTests", dependencies: ["World"]),
        .testTarget(name: "EditingTests", dependencies: ["Editing"], resources: [.copy("Fixtures")]),
        .testTarget(name: "LanguageModelTests", dependencies: ["LanguageModel"], resources: [.copy("Fixtures")]),
        .testTarget(name: "PipelineTests", dependencies: ["Pipeline"], resources: [.copy("Fixtures")]),
    ],
    // Swift 5 language mode: the kernels hand raw buffers to concurrent loops, which the Swift 6
    // data-race checker cannot see are disjoint.
    swiftLanguageModes: [.v5]
)
