import ArgumentParser
import Foundation
import TensorCore

struct BenchKernels: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "kernels",
        abstract: "Matrix-multiply GFLOP/s (n = 256…2048) and forward+backward times of the main kernels.")

    @Option(help: "Comma-separated matrix sizes.")
    var sizes: String = "256,512,1024,2048"

    @Flag(help: "Print JSON.")
    var json = false

    func validate() throws {
        guard parsedSizes != nil else { throw ValidationError("--sizes must be positive integers separated by commas") }
    }

    var parsedSizes: [Int]? {
        let v = sizes.split(separator: ",").compactMap { Int($0.trimmingCharacters(in: .whitespaces)) }
        return v.isEmpty || v.contains { $0 <= 0 } || v.count != sizes.split(separator: ",").count ? nil : v
    }

    func run() throws {
        let report = KernelBenchmark.run(sizes: parsedSizes!)
        if json {
            let enc = JSONEncoder()
            enc.outputFormatting = [.prettyPrinted, .sortedKeys]
            print(String(decoding: try enc.encode(report), as: UTF8.self))
            return
        }
        print("matrix multiply (float32, OpenBLAS threads: \(report.threads))")
        print("     n   ours GFLOP/s   cblas GFLOP/s   overhead")
        for m in report.matmul {
            print(String(format: "%6d   %12.1f   %13.1f   %7.1f%%", m.n, m.gflops, m.blasGflops, m.overhead * 100))
        }
        print("\nkernel          shape                          forward ms   backward ms")
        for k in report.kernels {
            let name = k.name.padding(toLength: 15, withPad: " ", startingAt: 0)
            let shape = k.shape.padding(toLength: 30, withPad: " ", startingAt: 0)
            print(name + " " + shape + String(format: " %10.3f   %11.3f", k.forwardMs, k.backwardMs))
        }
    }
}
