import COpenBLAS
import Foundation

/// Dense symmetric positive definite solves (LAPACK `dpotrf`/`dpotrs` through OpenBLAS), in double
/// precision: the systems are Gram matrices of activations whose float32 conditioning is poor.
public enum LinearAlgebra {
    public enum Failure: Error, CustomStringConvertible, Equatable {
        /// The matrix is not positive definite (LAPACK's `info`: the order of the failing minor).
        case notPositiveDefinite(minor: Int)

        public var description: String {
            switch self {
            case let .notPositiveDefinite(minor): return "matrix is not positive definite (leading minor \(minor))"
            }
        }
    }

    /// A Cholesky factor of a symmetric positive definite n × n matrix, reusable for several right-hand sides.
    public struct Cholesky {
        public let n: Int
        /// The factor, column-major lower triangle (LAPACK's layout; the matrix is symmetric, so the
        /// row-major input is the same array).
        var factor: [Double]

        /// Factorises `a` (n × n, row-major; only its symmetric part is meaningful).
        public init(_ a: [Double], n: Int) throws {
            precondition(a.count == n * n, "Cholesky: \(a.count) values for \(n) × \(n)")
            self.n = n
            factor = a
            var info: Int32 = 0
            var uplo = CChar(UInt8(ascii: "L")), nn = Int32(n), lda = Int32(max(n, 1))
            factor.withUnsafeMutableBufferPointer { dpotrf_(&uplo, &nn, $0.baseAddress, &lda, &info) }
            guard info == 0 else { throw Failure.notPositiveDefinite(minor: Int(info)) }
        }

        /// Solves A · X = B for B [n, m] row-major (float32), returning X [n, m] row-major.
        public func solve(_ b: Tensor) -> Tensor {
            let m = b.count / max(n, 1)
            precondition(b.count == n * m, "Cholesky.solve: \(b.shape) for n = \(n)")
            // Row-major [n, m] is column-major [m, n]; LAPACK wants column-major [n, m]: transpose.
            var x = [Double](repeating: 0, count: n * m)
            for i in 0..<n { for j in 0..<m { x[j * n + i] = Double(b.data[i * m + j]) } }
            var info: Int32 = 0
            var uplo = CChar(UInt8(ascii: "L")), nn = Int32(n), nrhs = Int32(m), lda = Int32(max(n, 1)), ldb = Int32(max(n, 1))
            factor.withUnsafeBufferPointer { f in
                x.withUnsafeMutableBufferPointer { dpotrs_(&uplo, &nn, &nrhs, f.baseAddress, &lda, $0.baseAddress, &ldb, &info) }
            }
            precondition(info == 0, "dpotrs: argument \(-info) is invalid")
            let out = Tensor(shape: b.shape)
            for i in 0..<n { for j in 0..<m { out.data[i * m + j] = Float(x[j * n + i]) } }
            return out
        }
    }
}
