import Foundation

#if FUZZING
/// libFuzzer's entry: the harness named by `DAFNET_FUZZ_HARNESS`.
private let harness: Harness = {
    guard let name = ProcessInfo.processInfo.environment["DAFNET_FUZZ_HARNESS"], let h = Harness(rawValue: name) else {
        fatalError("set DAFNET_FUZZ_HARNESS to one of: \(Harness.allCases.map(\.rawValue).joined(separator: ", "))")
    }
    return h
}()

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzOne(_ bytes: UnsafePointer<UInt8>?, _ count: Int) -> CInt {
    harness.run(bytes.map { Data(bytes: $0, count: count) } ?? Data())
    return 0
}

@_silgen_name("LLVMFuzzerRunDriver")
func LLVMFuzzerRunDriver(_ argc: UnsafeMutablePointer<CInt>, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?>,
                         _ callback: @convention(c) (UnsafePointer<UInt8>?, Int) -> CInt) -> CInt

/// SwiftPM links an executable's entry as `<module>_main`: hand it to libFuzzer's driver.
@_cdecl("dafnet_fuzz_main")
public func fuzzMain(_ argc: CInt, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?) -> CInt {
    var c = argc
    var v = argv
    return LLVMFuzzerRunDriver(&c, &v) { fuzzOne($0, $1) }
}
#else
/// `dafnet-fuzz replay DIR…` runs every file of the corpora (`DIR` named after its harness) through
/// its harness; `dafnet-fuzz seed ROOT OUT` writes the seed corpora from the repository at ROOT.
@main
struct FuzzTool {
    static func main() throws {
        let args = Array(CommandLine.arguments.dropFirst())
        switch args.first {
        case "replay":
            var n = 0
            for dir in args.dropFirst() {
                let url = URL(fileURLWithPath: dir)
                guard let h = Harness(rawValue: url.lastPathComponent) else {
                    FileHandle.standardError.write(Data("\(dir): not named after a harness\n".utf8)); exit(2)
                }
                for name in try FileManager.default.contentsOfDirectory(atPath: url.path).sorted() {
                    h.run(try Data(contentsOf: url.appendingPathComponent(name)))
                    n += 1
                }
            }
            print("replayed \(n) inputs")
        case "seed" where args.count == 3:
            for h in Harness.allCases {
                let dir = URL(fileURLWithPath: args[2]).appendingPathComponent(h.rawValue)
                try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
                for (name, data) in try h.seeds(root: URL(fileURLWithPath: args[1])) {
                    try data.write(to: dir.appendingPathComponent("seed-" + name))
                }
            }
        default:
            FileHandle.standardError.write(Data("usage: dafnet-fuzz replay DIR… | dafnet-fuzz seed ROOT OUT\n".utf8))
            exit(2)
        }
    }
}
#endif
