fn main() {
    println!("{}", forward_rewrite::version());
}
