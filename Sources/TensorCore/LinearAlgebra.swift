import COpenBLAS
import Foundation

/// Dense symmetric positive definite solves (LAPACK `dpotrf`, BLAS `dtrsm` through OpenBLAS), in double
/// precision: the systems are Gram matrices of activations whose float32 conditioning is poor.
public enum LinearAlgebra {
    public enum Failure: Error, CustomStringConvertible, Equatable {
        /// The matrix is not positive definite (LAPACK's `info`: the order of the failing minor).
        case notPositiveDefinite(minor: Int)
        /// The eigenvalue iteration did not converge (LAPACK's `info`).
        case eigenNotConverged(info: Int)

        public var description: String {
            switch self {
            case let .notPositiveDefinite(minor): return "matrix is not positive definite (leading minor \(minor))"
            case let .eigenNotConverged(info): return "symmetric eigendecomposition did not converge (LAPACK info \(info))"
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
            guard n > 0 && m > 0 else { return Tensor(shape: b.shape) }
            // Row-major B [n, m] is column-major Bᵀ [m, n]; A is symmetric, so Xᵀ = Bᵀ·A⁻¹ = Bᵀ·L⁻ᵀ·L⁻¹: two
            // triangular solves from the right on Bᵀ as it lies, no transposed copies.
            var x = [Double](repeating: 0, count: n * m)
            for i in 0..<(n * m) { x[i] = Double(b.data[i]) }
            let nn = Int32(n), mm = Int32(m)
            factor.withUnsafeBufferPointer { f in
                x.withUnsafeMutableBufferPointer { xb in
                    cblas_dtrsm(CblasColMajor, CblasRight, CblasLower, CblasTrans, CblasNonUnit, mm, nn, 1, f.baseAddress, nn, xb.baseAddress, mm)
                    cblas_dtrsm(CblasColMajor, CblasRight, CblasLower, CblasNoTrans, CblasNonUnit, mm, nn, 1, f.baseAddress, nn, xb.baseAddress, mm)
                }
            }
            let out = Tensor(shape: b.shape)
            for i in 0..<(n * m) { out.data[i] = Float(x[i]) }
            return out
        }
    }

    /// Eigenvalues (ascending) and orthonormal eigenvectors of a symmetric n × n matrix (row-major; only
    /// its symmetric part is meaningful), by LAPACK `dsyevd` in double precision. `vectors` is row-major
    /// [n, n] with eigenvector j in column j.
    public static func symmetricEigen(_ a: [Double], n: Int) throws -> (values: [Double], vectors: [Double]) {
        precondition(a.count == n * n, "symmetricEigen: \(a.count) values for \(n) × \(n)")
        guard n > 0 else { return ([], []) }
        var m = a  // symmetric: row-major is column-major
        var w = [Double](repeating: 0, count: n)
        var jobz = CChar(UInt8(ascii: "V")), uplo = CChar(UInt8(ascii: "L")), nn = Int32(n), lda = Int32(n), info: Int32 = 0
        // Workspace query, then the decomposition.
        var lwork: Int32 = -1, liwork: Int32 = -1, workSize = 0.0, iworkSize: Int32 = 0
        dsyevd_(&jobz, &uplo, &nn, &m, &lda, &w, &workSize, &lwork, &iworkSize, &liwork, &info)
        lwork = Int32(workSize); liwork = iworkSize
        var work = [Double](repeating: 0, count: Int(lwork))
        var iwork = [Int32](repeating: 0, count: Int(liwork))
        dsyevd_(&jobz, &uplo, &nn, &m, &lda, &w, &work, &lwork, &iwork, &liwork, &info)
        guard info == 0 else { throw Failure.eigenNotConverged(info: Int(info)) }
        // Column-major output: eigenvector j is m[j*n ..< (j+1)*n]; return row-major with vectors in columns.
        var v = [Double](repeating: 0, count: n * n)
        for j in 0..<n { for i in 0..<n { v[i * n + j] = m[j * n + i] } }
        return (w, v)
    }
}
