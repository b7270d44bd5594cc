import ArgumentParser
import Foundation

/// Writes a line to standard error.
func printError(_ message: String) {
    FileHandle.standardError.write(Data((message + "\n").utf8))
}

/// Rewrites the progress line on standard error (carriage return, clear to the end of the line).
func printProgress(_ line: String) {
    FileHandle.standardError.write(Data(("\r\u{1B}[K" + line).utf8))
}

/// The exit statuses of every command, one meaning each (the README lists them).
enum ExitStatus {
    /// A check found problems (`checkpoints verify`, `check-reference`).
    static let checkFailed: Int32 = 1
    /// The command failed: bad input, a missing or damaged file, an I/O error, a store error.
    static let failure: Int32 = 2
    /// Another daemon holds the store or the inbox.
    static let alreadyRunning: Int32 = 3
    /// `watch` ran, and some batches went to `failed/` (rejected, or refused by the collapse guard).
    static let batchesFailed: Int32 = 4
}

/// Runs a library call and maps its thrown error to a message and an exit code; only the CLI does this.
func runMapped<T>(_ body: () throws -> T) throws -> T {
    do {
        return try body()
    } catch let error as ExitCode {
        throw error
    } catch let error as CleanExit {
        throw error
    } catch {
        printError("error: \(error)")
        throw ExitCode(ExitStatus.failure)
    }
}
